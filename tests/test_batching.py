"""Training batches: left padding, answer labels aligned with the kept logits, and a padded
row scoring exactly as it does alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM

from hatllm_edge.core.data import Catalog, Example, Window
from hatllm_edge.core.masks import LayerSchedule, build_masks, causal_visibility
from hatllm_edge.core.prompt import PromptBuilder
from hatllm_edge.training.batching import (
    allowed_tokens,
    answer_nll,
    make_batch,
    make_window_batch,
    msl_nll,
)
from hatllm_edge.training.model import HatLLM

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


def test_a_batch_moves_whole_to_a_device(prompts: PromptBuilder) -> None:
    """Every tensor of a batch goes to the training device (a forgotten one fails only on a GPU)."""
    batch = make_window_batch([Window("u1", ("a", "b", "c", "d"), 1)], CATALOG, prompts)
    assert batch.to("cpu") is batch
    moved = batch.to("meta")
    tensors = {k: v for k, v in vars(moved).items() if isinstance(v, torch.Tensor)} | {f"mask {k}": m for k, m in moved.masks.items()}
    assert len(tensors) >= 6 and all(t.device.type == "meta" for t in tensors.values()), tensors.keys()
    assert (moved.targets, moved.tokens) == (batch.targets, batch.tokens)


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


WINDOWS = [
    Window("u1", ("a", "b", "c", "d", "c"), 1),  # every title after the first is a target
    Window("u2", ("d", "b", "a"), 2),  # only the last: the earlier ones were trained by an earlier window
]


def test_window_layout_is_the_prompts_it_replaces(prompts: PromptBuilder) -> None:
    """Each target's tokens before its answer are exactly its one-target prompt, and its labels
    are exactly its answer."""
    batch = make_window_batch(WINDOWS, CATALOG, prompts)
    assert batch.targets == sum(len(w.examples()) for w in WINDOWS) == 5
    width = batch.input_ids.shape[1]
    for r, w in enumerate(WINDOWS):
        row = batch.input_ids[r].numpy()
        labelled = np.flatnonzero(batch.labels[r].numpy() != -100)  # positions predicting an answer token
        spans = np.split(labelled, np.flatnonzero(np.diff(labelled) > 1) + 1)
        assert len(spans) == len(w.examples())
        for ex, span in zip(w.examples(), spans):
            p = prompts.prompt([CATALOG.title(i) for i in ex.history])
            a = prompts.answer(CATALOG.title(ex.target), prompts.answer_segment(p))
            start = span[0] + 1  # the first answer token
            pad = width - len(prompts.sequence([CATALOG.title(i) for i in w.items])[0])
            assert row[pad:start].tolist() == p.ids.tolist()
            assert batch.segments[r, pad:start].tolist() == p.segments.tolist()
            assert row[start : start + len(a)].tolist() == a.ids.tolist()
            assert batch.segments[r, start : start + len(a)].tolist() == a.segments.tolist()
            assert batch.labels[r, span].tolist() == a.ids.tolist()


@pytest.mark.parametrize("n_in,n_cr", [(0, 0), (1, 1), (2, 0), (0, 2)])
def test_window_loss_is_the_sum_of_the_one_target_losses(prompts: PromptBuilder, n_in: int, n_cr: int) -> None:
    """One pass over a window trains each target exactly as its own prompt would: same
    logits per answer token (so HatLLM's masks need no change), same summed loss."""
    torch.manual_seed(0)
    model = HatLLM(LlamaForCausalLM(tiny_llama_config(layers=2, init=0.2)).eval(), LayerSchedule(2, n_in, n_cr))
    window = make_window_batch(WINDOWS, CATALOG, prompts)
    examples = [ex for w in WINDOWS for ex in w.examples()]
    single = make_batch(examples, CATALOG, prompts)
    with torch.no_grad():
        w_logits, _ = model(window.input_ids, window.position_ids, window.masks, logits_index=window.logits_index)
        s_logits, _ = model(single.input_ids, single.position_ids, single.masks, logits_index=single.logits_index)
    assert answer_nll(w_logits, window.labels).item() == pytest.approx(answer_nll(s_logits, single.labels).item(), rel=1e-5)
    # per target: the answer tokens' logits agree, not just the sums
    e = 0
    for r, w in enumerate(WINDOWS):
        labelled = np.flatnonzero(window.labels[r].numpy() != -100)
        for span in np.split(labelled, np.flatnonzero(np.diff(labelled) > 1) + 1):
            keep = single.labels[e].numpy() != -100
            torch.testing.assert_close(w_logits[r, span], s_logits[e, keep], rtol=1e-4, atol=1e-4)
            e += 1


def test_windows_cover_every_training_target_once() -> None:
    from hatllm_edge.core.data import Dataset

    seqs = {"u1": tuple("abcdefghijkl"), "u2": ("a", "b", "c"), "u3": ("a", "b", "c", "d")}
    data = Dataset("toy", Catalog(tuple("abcdefghijkl"), tuple("ABCDEFGHIJKL")), seqs)
    for max_history, stride in [(3, None), (3, 1), (4, 2), (20, None)]:
        windows = data.train_windows(max_history, stride)
        got = sorted((ex.user_id, ex.history, ex.target) for w in windows for ex in w.examples())
        targets = sorted((ex.user_id, ex.target, len(ex.history)) for ex in data.train_examples(max_history))
        assert sorted((u, t, len(h)) for u, h, t in got) != [] and len(got) == len(targets)
        assert sorted((u, t) for u, _, t in got) == sorted((u, t) for u, t, _ in targets)
        for w in windows:
            assert len(w.items) <= max_history + 1
            assert len(w.items) - w.first_target <= (stride or max_history)
            # the earliest target sees max_history - stride + 1 items, unless the sequence starts there
            seq = seqs[w.user_id][:-2]
            start = next(i for i in range(len(seq)) if seq[i : i + len(w.items)] == w.items)
            assert w.first_target == min(start + w.first_target, max_history - (stride or max_history) + 1) or start == 0


def test_msl_at_temperature_one_is_minus_the_renormalised_beam_score(prompts: PromptBuilder) -> None:
    """The masked-softmax loss of an answer is minus its trie-renormalised log-probability:
    the loss and the decoding it pairs with agree; and it never exceeds the full-vocabulary loss."""
    from hatllm_edge.ranking.scoring import Fusion
    from hatllm_edge.ranking.search import beam_search
    from hatllm_edge.ranking.trie import TitleTrie
    from hatllm_edge.training.torch_backend import TorchBackend

    torch.manual_seed(0)
    model = HatLLM(LlamaForCausalLM(tiny_llama_config(layers=2, init=0.2)).eval(), LayerSchedule(2, 1, 1))
    trie = TitleTrie.build(CATALOG, prompts)
    for build, units in ((make_window_batch, WINDOWS), (make_batch, EXAMPLES)):
        batch = build(units, CATALOG, prompts)
        with torch.no_grad():
            logits, _ = model(batch.input_ids, batch.position_ids, batch.masks, logits_index=batch.logits_index)
            hidden, _ = model(batch.input_ids, batch.position_ids, batch.masks, logits_index=batch.logits_index, hidden=True)
        assert torch.allclose(model.head(hidden), logits, atol=1e-6)
        allowed = allowed_tokens(batch, trie)
        assert allowed.shape[0] == int((batch.labels != -100).sum())
        msl = msl_nll(hidden, model.head, batch.labels, allowed).item()
        assert msl <= answer_nll(logits, batch.labels).item()
        examples = [ex for w in units for ex in w.examples()] if build is make_window_batch else units
        expected = 0.0
        for ex in examples:
            ranked = beam_search(TorchBackend(model), prompts, trie, [[CATALOG.title(i) for i in ex.history]],
                                 k=len(CATALOG), beams=len(CATALOG), fusion=Fusion(renormalise=True))[0]
            expected -= ranked.scores[ranked.items.index(CATALOG.index(ex.target))]
        assert msl == pytest.approx(expected, rel=1e-4)
    # a high temperature flattens the softmax over the allowed tokens: log(choices) per token
    uniform = float(np.log((allowed >= 0).sum(1).numpy()).sum())
    assert msl_nll(hidden, model.head, batch.labels, allowed, temperature=100.0).item() == pytest.approx(uniform, rel=0.05)


def test_msl_from_the_allowed_tokens_logits_has_the_full_vocabularys_gradients(prompts: PromptBuilder) -> None:
    """The loss computes logits for the batch's allowed tokens only; its value and its gradients
    (to the hidden states and to a trainable head) are those of the masked softmax taken over
    the whole vocabulary's logits, at every temperature."""
    from hatllm_edge.ranking.trie import TitleTrie

    torch.manual_seed(0)
    model = HatLLM(LlamaForCausalLM(tiny_llama_config(layers=2, init=0.2)).eval(), LayerSchedule(2, 1, 1))
    batch = make_window_batch(WINDOWS, CATALOG, prompts)
    allowed = allowed_tokens(batch, TitleTrie.build(CATALOG, prompts))
    with torch.no_grad():
        hidden, _ = model(batch.input_ids, batch.position_ids, batch.masks, hidden=True)
    keep = batch.labels != -100
    for temperature in (1.0, 0.5):
        grads = []
        for full in (False, True):
            h = hidden.clone().requires_grad_(True)
            model.head.weight.grad = None
            if full:  # the reference: every logit, then the allowed ones picked out
                logits = model.head(h)[keep].float() / temperature
                options = logits.gather(1, allowed.clamp(min=0)).masked_fill(allowed < 0, float("-inf"))
                loss = (torch.logsumexp(options, 1) - logits.gather(1, batch.labels[keep][:, None])[:, 0]).sum()
            else:
                loss = msl_nll(h, model.head, batch.labels, allowed, temperature)
            loss.backward()
            grads.append((loss.item(), h.grad, model.head.weight.grad.clone()))
        (ours, h_ours, w_ours), (ref, h_ref, w_ref) = grads
        assert ours == pytest.approx(ref, rel=1e-6)
        assert torch.allclose(h_ours, h_ref, atol=1e-6) and h_ours.abs().sum() > 0
        assert torch.allclose(w_ours, w_ref, atol=1e-6) and w_ours.abs().sum() > 0
