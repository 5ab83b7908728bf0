"""Training batches: prompt + answer, left-padded so that every answer ends at the last
column and only the answer's positions need logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from hatllm_edge.data import Catalog, Example
from hatllm_edge.masks import MaskKind, build_masks, causal_visibility
from hatllm_edge.prompt import PromptBuilder


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L]
    position_ids: torch.Tensor  # [B, L]
    masks: dict[MaskKind, torch.Tensor]  # kind -> bool [B, 1, L, L]
    logits_index: torch.Tensor  # [A]: the positions whose logits predict answer tokens
    labels: torch.Tensor  # [B, A], -100 where not an answer token
    segments: torch.Tensor  # [B, L]


def make_batch(examples: Sequence[Example], catalog: Catalog, prompts: PromptBuilder) -> Batch:
    rows = []
    for ex in examples:
        p = prompts.prompt([catalog.title(i) for i in ex.history])
        a = prompts.answer(catalog.title(ex.target), prompts.answer_segment(p))
        rows.append((np.concatenate([p.ids, a.ids]), np.concatenate([p.segments, a.segments]), len(a)))
    width = max(len(ids) for ids, _, _ in rows)
    answer_width = max(n for _, _, n in rows)
    b = len(rows)
    ids = np.zeros((b, width), dtype=np.int64)
    segs = np.zeros((b, width), dtype=np.int64)
    valid = np.zeros((b, width), dtype=bool)
    labels = np.full((b, answer_width), -100, dtype=np.int64)
    for r, (row_ids, row_segs, n) in enumerate(rows):
        ids[r, width - len(row_ids) :] = row_ids
        segs[r, width - len(row_ids) :] = row_segs
        valid[r, width - len(row_ids) :] = True
        labels[r, answer_width - n :] = row_ids[-n:]
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    t = torch.from_numpy
    masks = build_masks(t(segs), t(segs), causal_visibility(t(valid), width))
    return Batch(
        input_ids=t(ids),
        position_ids=t(positions),
        masks=masks,
        logits_index=torch.arange(width - answer_width - 1, width - 1),
        labels=t(labels),
        segments=t(segs),
    )
