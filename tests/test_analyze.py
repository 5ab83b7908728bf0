"""Attention skew: bucket sums against a hand-built attention matrix, the mask invariants
(IN: no other-item mass, CR: no same-item mass), batching invariance, the plot, the CLI.
Uses conftest's real SmolLM2 tokenizer (``hf_tokenizer``, ``prompts``) and tiny random Llama."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from hatllm_edge.core.data import Catalog, Example
from hatllm_edge.core.formats import ModelMeta, PromptMeta
from hatllm_edge.core.masks import LayerSchedule
from hatllm_edge.core.prompt import PromptBuilder
from hatllm_edge.training.analyze import (
    attention_skew,
    bucket_masks,
    layer_masses,
    layer_summary,
    plot_skew,
    skew_table,
    summarize,
)
from hatllm_edge.training.model import HatLLM

LAYERS = 4
TITLES = ["Toy Story (1995)", "Heat (1995)", "Fargo (1996)", "Scream (1996)", "Contact (1997)", "Titanic (1997)"]
CATALOG = Catalog(tuple(f"i{n}" for n in range(len(TITLES))), tuple(TITLES))
EXAMPLES = [
    Example("u1", ("i0", "i1", "i2"), "i3"),
    Example("u2", ("i4",), "i5"),
    Example("u3", ("i1", "i3", "i5", "i0", "i2"), "i4"),
]


@pytest.fixture(scope="module")
def lm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)
    return LlamaForCausalLM(cfg).eval()


def _skew(lm: LlamaForCausalLM, prompts: PromptBuilder, n_in: int = 0, n_cr: int = 0, **kw) -> dict:  # type: ignore[no-untyped-def]
    return attention_skew(HatLLM(lm, LayerSchedule(LAYERS, n_in, n_cr)), prompts, CATALOG, EXAMPLES, **kw)


def test_hand_built_attention() -> None:
    """Segments [0, 1, 1, 2, 2]; head 0 as written, head 1 uniform over the causal keys."""
    head0 = torch.tensor([
        [1.0, 0, 0, 0, 0],
        [0.5, 0.5, 0, 0, 0],
        [0.2, 0.6, 0.2, 0, 0],
        [0.1, 0.2, 0.3, 0.4, 0],
        [0.1, 0.1, 0.2, 0.4, 0.2],
    ])
    head1 = torch.ones(5, 5).tril() / torch.arange(1, 6)[:, None]
    probs = torch.stack([head0, head1])[None]  # [1, 2, 5, 5]
    segments = torch.tensor([[0, 1, 1, 2, 2]])
    buckets = bucket_masks(segments, torch.ones(1, 5, dtype=torch.bool))
    # pairs: same (2,1) (4,3); other (3,1) (3,2) (4,1) (4,2); non-item (q,0) for q = 1..4
    assert buckets.sum((1, 2, 3)).tolist() == [2, 4, 4, 4]
    h = lambda q, k: (head0[q, k] + head1[q, k]).item() / 2  # noqa: E731  head mean
    same = h(2, 1) + h(4, 3)
    other = h(3, 1) + h(3, 2) + h(4, 1) + h(4, 2)
    non = sum(h(q, 0) for q in range(1, 5))
    itself = sum(h(q, q) for q in range(1, 5))
    masses = layer_masses(probs, buckets)
    assert masses.tolist() == pytest.approx([same, other, non, itself])
    out = summarize(masses[None].numpy(), buckets.sum((1, 2, 3)).double().numpy())
    assert out["same"] == pytest.approx([same / 4]) and out["other"] == pytest.approx([other / 4])
    assert out["pair_same"] == pytest.approx([same / 2]) and out["pair_other"] == pytest.approx([other / 4])
    assert out["pair_non_item"] == pytest.approx([non / 4])
    assert out["ratio"] == pytest.approx([same / other]) and out["pair_ratio"] == pytest.approx([2 * same / other])
    assert same / 4 + other / 4 + non / 4 + itself / 4 == pytest.approx(1.0)


def test_padding_keys_and_rows_count_for_nothing() -> None:
    segments = torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 2, 2]])  # row 0: two columns of left padding
    valid = torch.tensor([[False, False, True, True, True], [True] * 5])
    counts = bucket_masks(segments, valid).sum((2, 3))  # [4, B]
    assert counts[:, 0].tolist() == [1, 0, 2, 2]  # (4,3) same; (3,2) (4,2) non-item; 2 selves
    assert counts[:, 1].tolist() == [2, 4, 4, 4]


def test_masses_sum_to_one_and_batching_does_not_matter(lm: LlamaForCausalLM, prompts: PromptBuilder) -> None:
    one = _skew(lm, prompts, batch_size=1)
    three = _skew(lm, prompts, batch_size=3)
    layers = one["layers"]
    total = np.sum([layers[b] for b in ("same", "other", "non_item", "self")], axis=0)
    assert np.abs(total - 1).max() < 1e-5
    assert all(v > 0 for b in ("same", "other", "non_item") for v in layers[b])
    for key in ("same", "other", "non_item", "pair_same", "ratio", "pair_ratio"):
        assert three["layers"][key] == pytest.approx(layers[key], rel=1e-4)
    assert one["item_queries"] == three["item_queries"] > 0 and one["pairs"] == three["pairs"]
    assert one["examples"] == 3 and one["layer_kinds"] == ["or"] * LAYERS


def test_in_layers_have_no_other_item_mass(lm: LlamaForCausalLM, prompts: PromptBuilder) -> None:
    res = _skew(lm, prompts, n_in=LAYERS)
    assert res["layers"]["other"] == [0.0] * LAYERS and res["layers"]["pair_other"] == [0.0] * LAYERS
    assert res["layers"]["ratio"] == [None] * LAYERS
    assert all(v > 0 for v in res["layers"]["same"])
    # plain masks: the same weights under the causal mask are the all-OR model
    plain = _skew(lm, prompts, n_in=LAYERS, plain_masks=True)
    assert plain["layer_kinds"] == ["or"] * LAYERS
    assert plain["layers"]["ratio"] == pytest.approx(_skew(lm, prompts)["layers"]["ratio"], rel=1e-5)


def test_cr_layers_have_no_same_item_mass(lm: LlamaForCausalLM, prompts: PromptBuilder) -> None:
    res = _skew(lm, prompts, n_cr=LAYERS)
    assert res["layers"]["same"] == [0.0] * LAYERS and res["layers"]["ratio"] == [0.0] * LAYERS
    assert all(v > 0 for v in res["layers"]["other"])


def test_mixed_schedule_summary_table_and_plot(lm: LlamaForCausalLM, prompts: PromptBuilder, tmp_path: Path) -> None:
    results = {"causal": _skew(lm, prompts), "HatLLM": _skew(lm, prompts, n_in=2, n_cr=1)}
    hat = results["HatLLM"]["layers"]["ratio"]  # thirds of 4 layers: [0, 1] IN, [2] OR, [3] CR
    summary = layer_summary(results["HatLLM"]["layers"])
    assert summary["all"] == {"mean": pytest.approx((hat[2] + 0.0) / 2), "undefined": 2}
    assert summary["first"] == {"mean": None, "undefined": 2}
    assert summary["middle"] == {"mean": hat[2], "undefined": 0} and summary["last"]["mean"] == 0.0
    table = skew_table(results).splitlines()
    assert table[1].startswith("causal") and "inf" not in table[1]
    assert table[2].startswith("HatLLM") and "2/1/1" in table[2] and "inf" in table[2] and "*" in table[2]
    path = tmp_path / "skew.png"
    plot_skew(results, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(path) as im:
        im.verify()


def test_cli_writes_json_and_png(lm: LlamaForCausalLM, hf_tokenizer: Any, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hatllm_edge.cli import app
    from hatllm_edge.training.checkpoint import FULL_WEIGHTS, write_common

    base = tmp_path / "base"
    lm.save_pretrained(base)
    hf_tokenizer.save_pretrained(base)
    ckpt = tmp_path / "ckpt"
    meta = ModelMeta(base={"path": str(base), "gguf_file": None}, model_type="llama",
                     schedule={"num_layers": LAYERS, "n_in": 1, "n_cr": 1},
                     prompt=PromptMeta(hf_tokenizer.eos_token, 5), finetune="full")
    write_common(ckpt, hf_tokenizer, CATALOG, meta)
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, str(ckpt / FULL_WEIGHTS))
    items = tmp_path / "items.tsv"
    items.write_text("item_id\ttitle\n" + "".join(f"{i}\t{t}\n" for i, t in zip(CATALOG.item_ids, CATALOG.titles)))
    inter = tmp_path / "inter.csv"
    inter.write_text("user_id,item_id,timestamp\n" + "".join(
        f"u{u},i{(u + t) % 6},{t}\n" for u in range(3) for t in range(4)))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["analyze", str(ckpt), "--label", "hat", "--examples", "2", "--items", str(items),
                                   "--interactions", str(inter), "--out-dir", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "base" in res.output and "hat" in res.output
    doc = json.loads((out / "skew.json").read_text())
    assert list(doc["models"]) == ["base", "hat"] and doc["models"]["hat"]["examples"] == 2
    assert doc["models"]["hat"]["layers"]["ratio"][0] is None  # the IN layer
    assert (out / "skew.png").read_bytes()[:4] == b"\x89PNG"
    bad = CliRunner().invoke(app, ["analyze", str(ckpt), "--label", "a", "--label", "b", "--items", str(items),
                                   "--interactions", str(inter), "--out-dir", str(out)])
    assert bad.exit_code == 2 and "labels" in bad.output
