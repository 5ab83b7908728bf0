"""Training batches, left-padded, with labels for the answer tokens only, and the two losses
over them: cross-entropy over the vocabulary (:func:`answer_nll`) and the masked-softmax loss
over the tokens that continue a real title (:func:`msl_nll`).

* :func:`make_batch`: one target per row (prompt + answer); every answer ends at the last
  column, so only the answer's positions need logits.
* :func:`make_window_batch`: one window of a user's sequence per row (list template); every
  title after the window's ``first_target`` is an answer, trained in the same pass.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from hatllm_edge.core.data import Catalog, Example, Window
from hatllm_edge.core.masks import (
    MaskKind,
    build_masks,
    causal_visibility,
    left_padded,
    padded_positions,
)
from hatllm_edge.core.prompt import PromptBuilder
from hatllm_edge.ranking.trie import TitleTrie


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L]
    position_ids: torch.Tensor  # [B, L]
    masks: dict[MaskKind, torch.Tensor]  # kind -> bool [B, 1, L, L]
    logits_index: torch.Tensor | None  # [A]: the positions whose logits predict answer tokens (None: all)
    labels: torch.Tensor  # [B, A] (or [B, L]): the token each kept position predicts, -100 where not an answer token
    segments: torch.Tensor  # [B, L]
    targets: int  # answers (titles) in the batch
    tokens: int  # real (not padding) tokens in the batch

    def to(self, device: torch.device | str) -> "Batch":
        """The batch's tensors on ``device`` (itself where they are there already)."""
        if self.input_ids.device == torch.device(device):
            return self

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return replace(self, input_ids=move(self.input_ids), position_ids=move(self.position_ids),
                       masks={k: move(m) for k, m in self.masks.items()}, logits_index=move(self.logits_index),
                       labels=move(self.labels), segments=move(self.segments))


def answer_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood of the labelled tokens: the quantity both batch
    kinds train (a window's sum is the sum of its one-target prompts' sums)."""
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


def allowed_tokens(batch: Batch, trie: TitleTrie) -> torch.Tensor:
    """For every labelled position (row-major order, as ``labels != -100`` lists them): the
    tokens that continue a catalog title there (the trie node's children), -1 padded, [N, C].
    Each answer is walked from the trie's root, so the end marker's tokens are covered too."""
    out: list[np.ndarray] = []
    labels = batch.labels.numpy()
    segs = batch.segments.numpy()
    cols = batch.logits_index.numpy() if batch.logits_index is not None else np.arange(labels.shape[1])
    for r in range(labels.shape[0]):
        node = 0
        for j in np.flatnonzero(labels[r] != -100):
            if j == 0 or labels[r, j - 1] == -100:
                node = 0  # the first token of an answer
            ch = trie.expand(node)
            out.append(ch.allowed)
            is_title = bool(segs[r, cols[j] + 1] != 0)  # the labelled token's own segment
            node = trie.children[node][(int(labels[r, j]), is_title)]
    width = max((len(a) for a in out), default=1)
    allowed = np.full((len(out), width), -1, dtype=np.int64)
    for n, a in enumerate(out):
        allowed[n, : len(a)] = a
    return torch.from_numpy(allowed)


def msl_nll(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor, allowed: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """Summed masked-softmax loss (MSL, Wang et al. SIGIR 2025): at each answer token, the
    softmax (at ``temperature``) over only the tokens that continue a real title, so the
    model is not taught to push down tokens no title could use. At temperature 1 it is minus
    the trie-renormalised log-probability beam search scores with.

    It needs no other logits, so it takes the final hidden states [B, A, H] and the LM head,
    and computes logits for the batch's allowed tokens only (a few thousand of a vocabulary of
    tens of thousands): the same loss, without the head's full [tokens x vocabulary] product,
    which held a fifth of a step's arithmetic and its largest activations."""
    keep = labels != -100
    vocab, column = torch.unique(allowed.clamp(min=0), return_inverse=True)  # column: [N, C] into vocab
    bias = None if head.bias is None else head.bias[vocab]
    logits = torch.nn.functional.linear(hidden[keep], head.weight[vocab], bias).float() / temperature  # [N, |vocab|]
    target = logits.gather(1, torch.searchsorted(vocab, labels[keep])[:, None])[:, 0]  # every label is allowed
    options = logits.gather(1, column).masked_fill(allowed < 0, float("-inf"))
    return (torch.logsumexp(options, dim=1) - target).sum()


def make_batch(examples: Sequence[Example], catalog: Catalog, prompts: PromptBuilder) -> Batch:
    rows, answers = [], []
    for ex in examples:
        p = prompts.prompt([catalog.title(i) for i in ex.history])
        a = prompts.answer(catalog.title(ex.target), prompts.answer_segment(p))
        rows.append((np.concatenate([p.ids, a.ids]), np.concatenate([p.segments, a.segments])))
        answers.append(len(a))
    ids, segs, valid = left_padded(rows)
    width = ids.shape[1]
    answer_width = max(answers)
    labels = np.full((len(rows), answer_width), -100, dtype=np.int64)
    for r, n in enumerate(answers):
        labels[r, answer_width - n :] = ids[r, width - n :]
    return _batch(ids, segs, valid, labels, torch.arange(width - answer_width - 1, width - 1), len(rows))


def make_window_batch(windows: Sequence[Window], catalog: Catalog, prompts: PromptBuilder) -> Batch:
    """One row per window; the label at position p is the token at p + 1 where that token is
    part of a target's answer (title and end marker)."""
    rows, spans = [], []
    for w in windows:
        encoded, answer_spans = prompts.sequence([catalog.title(i) for i in w.items])
        rows.append((encoded.ids, encoded.segments))
        spans.append(answer_spans[w.first_target :])
    ids, segs, valid = left_padded(rows)
    width = ids.shape[1]
    labels = np.full(ids.shape, -100, dtype=np.int64)
    for r, ((row_ids, _), row_spans) in enumerate(zip(rows, spans)):
        offset = width - len(row_ids)
        for span in row_spans:
            labels[r, offset + span.start - 1 : offset + span.stop - 1] = row_ids[span]
    return _batch(ids, segs, valid, labels, None, sum(len(x) for x in spans))


def _batch(ids: np.ndarray, segs: np.ndarray, valid: np.ndarray, labels: np.ndarray, logits_index: torch.Tensor | None,
           targets: int) -> Batch:
    positions = padded_positions(valid)
    t = torch.from_numpy
    masks = build_masks(t(segs), t(segs), causal_visibility(t(valid), ids.shape[1]))
    return Batch(
        input_ids=t(ids),
        position_ids=t(positions),
        masks=masks,
        logits_index=logits_index,
        labels=t(labels),
        segments=t(segs),
        targets=targets,
        tokens=int(valid.sum()),
    )
