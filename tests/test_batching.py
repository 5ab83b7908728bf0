"""Training batches: left padding, answer labels aligned with the kept logits, and a padded
row scoring exactly as it does alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from conftest import tiny_llama_config
from hatllm_edge.batching import make_batch
from hatllm_edge.data import Catalog, Example
from hatllm_edge.masks import LayerSchedule, build_masks, causal_visibility
from hatllm_edge.model import HatLLM
from hatllm_edge.prompt import PromptBuilder

CATALOG = Catalog(("a", "b", "c", "d"), ("Alpha (1990)", "Misérables, Les (1995)", 'He said "hi", then left', "D"))
EXAMPLES = [
    Example("u1", ("a", "b", "c"), "d"),  # long prompt, short answer
    Example("u2", ("d",), "b"),  # short prompt, long answer
    Example("u3", ("c", "c"), "a"),
]


def sequence(ex: Example, prompts: PromptBuilder) -> tuple[np.ndarray, np.ndarray, int]:
    p = prompts.prompt([CATALOG.title(i) for i in ex.history])
    a = prompts.answer(CATALOG.title(ex.target), prompts.answer_segment(p))
    return np.concatenate([p.ids, a.ids]), np.concatenate([p.segments, a.segments]), len(a)


def test_layout(prompts: PromptBuilder) -> None:
    batch = make_batch(EXAMPLES, CATALOG, prompts)
    seqs = [sequence(ex, prompts) for ex in EXAMPLES]
    width = max(len(s[0]) for s in seqs)
    answer_width = max(s[2] for s in seqs)
    assert batch.input_ids.shape == batch.position_ids.shape == batch.segments.shape == (3, width)
    assert batch.labels.shape == (3, answer_width)
    assert batch.logits_index.tolist() == list(range(width - answer_width - 1, width - 1))
    for r, (ids, segs, n) in enumerate(seqs):
        pad = width - len(ids)
        assert (batch.input_ids[r, :pad] == 0).all() and batch.input_ids[r, pad:].tolist() == ids.tolist()
        assert batch.segments[r, pad:].tolist() == segs.tolist() and (batch.segments[r, :pad] == 0).all()
        assert batch.position_ids[r, pad:].tolist() == list(range(len(ids)))
        assert batch.labels[r].tolist() == [-100] * (answer_width - n) + ids[-n:].tolist()
        # the kept logits predict exactly the labelled tokens: position p predicts p + 1
        keep = batch.logits_index.numpy() + 1
        labelled = batch.labels[r].numpy() != -100
        assert batch.input_ids[r, keep[labelled]].tolist() == ids[-n:].tolist()
        for kind, m in batch.masks.items():
            assert m.shape == (3, 1, width, width)
            assert not m[r, 0, pad:, :pad].any(), kind  # real tokens never see padding


@pytest.mark.parametrize("n_in,n_cr", [(0, 0), (1, 1)])
def test_padded_rows_score_as_alone(prompts: PromptBuilder, n_in: int, n_cr: int) -> None:
    torch.manual_seed(0)
    model = HatLLM(LlamaForCausalLM(tiny_llama_config(layers=2, init=0.2)).eval(), LayerSchedule(2, n_in, n_cr))
    batch = make_batch(EXAMPLES, CATALOG, prompts)
    with torch.no_grad():
        logits, _ = model(batch.input_ids, batch.position_ids, batch.masks, logits_index=batch.logits_index)
    for r, ex in enumerate(EXAMPLES):
        ids, segs, n = sequence(ex, prompts)
        t_ids, t_segs = torch.from_numpy(ids)[None], torch.from_numpy(segs)[None]
        m = build_masks(t_segs, t_segs, causal_visibility(torch.ones_like(t_ids, dtype=torch.bool), len(ids)))
        with torch.no_grad():
            alone, _ = model(t_ids, torch.arange(len(ids))[None], m)
        expected = F.cross_entropy(alone[0, -n - 1 : -1], t_ids[0, -n:], reduction="sum")
        got = F.cross_entropy(logits[r], batch.labels[r], ignore_index=-100, reduction="sum")
        assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-4)
