"""Export: the graph contract, fp32/NF4/int4 parity with PyTorch, the bundle and its failure modes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import model_meta, tiny_llama_config
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from hatllm_edge.core.errors import HatLLMError, InputError
from hatllm_edge.core.masks import LayerSchedule
from hatllm_edge.engine.bundle import file_sha256
from hatllm_edge.engine.quant import dequantized_linears
from hatllm_edge.engine.quant.nf4 import nf4_unpack
from hatllm_edge.engine.session import OnnxBackend
from hatllm_edge.export import (
    Int4Options,
    export_bundle,
    export_onnx,
    validate,
    verify_bundle,
)
from hatllm_edge.export.convert import LINEARS
from hatllm_edge.export.quant.nf4 import nf4_absmax, nf4_pack
from hatllm_edge.export.validate import (
    Step,
    compare,
    run_steps,
    run_torch,
    sample_steps,
)
from hatllm_edge.training.model import HatLLM


def tiny_llama(n_in: int = 1, n_cr: int = 1, **config: object) -> HatLLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, **config)
    return HatLLM(LlamaForCausalLM(cfg).eval(), LayerSchedule(4, n_in, n_cr))


def tiny_qwen2() -> HatLLM:
    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return HatLLM(Qwen2ForCausalLM(cfg).eval(), LayerSchedule(3, 1, 1))


def tiny_gemma3(window: int = 4) -> HatLLM:
    """Local layers with a 4-slot window (the sample steps are 9-11 slots long), a global last
    layer, non-zero norm weights (Gemma stores w where it multiplies by 1 + w)."""
    torch.manual_seed(2)
    cfg = Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                           sliding_window=window, layer_types=["sliding_attention"] * 3 + ["full_attention"])
    lm = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, param in lm.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.3)
    return HatLLM(lm, LayerSchedule(4, 1, 1))


@pytest.fixture(scope="module")
def llama() -> HatLLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def qwen2() -> HatLLM:
    return tiny_qwen2()


@pytest.fixture(scope="module")
def gemma3() -> HatLLM:
    return tiny_gemma3()


@pytest.fixture(scope="module")
def exported(llama: HatLLM, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("onnx")
    return {q: export_onnx(llama, out / f"{q}.onnx", quant=q) for q in ("none", "nf4", "int4")}


def test_sample_steps_exercise_every_mask_kind_and_padding() -> None:
    prefill, step = sample_steps(128)
    for s in (prefill, step):
        m = s.masks
        assert not np.array_equal(m["in"], m["or"]) and not np.array_equal(m["cr"], m["or"])
    assert not prefill.valid[1, 0] and not prefill.valid[2, -1]  # left- and right-padded rows
    assert step.masks["or"].shape == (3, 1, 2, 11)


def test_graph_contract_and_metadata(exported: dict[str, Path]) -> None:
    model = onnx.load(str(exported["none"]))
    assert [o.version for o in model.opset_import if o.domain == ""] == [23]
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    assert inputs["input_ids"].elem_type == onnx.TensorProto.INT64
    assert inputs["mask_in"].elem_type == onnx.TensorProto.BOOL
    assert {"mask_in", "mask_or", "mask_cr", "past_key_values.3.value"} <= inputs.keys()
    dims = [d.dim_param or d.dim_value for d in inputs["past_key_values.0.key"].shape.dim]
    assert dims == ["past_batch", 2, "past_sequence", 16]
    assert inputs["past_rows"].elem_type == onnx.TensorProto.INT64
    assert [d.dim_param for d in inputs["target_ids"].shape.dim] == ["batch", "sequence", "targets"]
    outputs = [o.name for o in model.graph.output]
    assert outputs[0] == "logits" and "present.3.value" in outputs
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["hatllm.layer_kinds"]) == ["in", "or", "or", "cr"]
    assert (meta["hatllm.n_in"], meta["hatllm.n_cr"], meta["hatllm.quant"]) == ("1", "1", "none")
    ops = {n.op_type for n in model.graph.node}
    assert {"Attention", "RotaryEmbedding", "RMSNormalization"} <= ops
    attention = [n for n in model.graph.node if n.op_type == "Attention"]
    assert [n.name for n in attention][0] == "/model/layers.0/attn/Attention"
    assert [n.input[3] for n in attention] == ["mask_in", "mask_or", "mask_or", "mask_cr"]
    # the past each Attention reads is the cache gathered by past_rows, inside the graph
    gathers = {n.output[0]: n for n in model.graph.node if n.op_type == "Gather"}
    assert all(gathers[n.input[4]].input == ["past_key_values.%d.key" % i, "past_rows"] for i, n in enumerate(attention))


@pytest.mark.parametrize("which", ["llama", "qwen2", "gemma3"])
def test_fp32_matches_pytorch(which: str, llama: HatLLM, qwen2: HatLLM, gemma3: HatLLM, tmp_path: Path) -> None:
    """Prefill from an empty cache then a cached step, B = 3 with left and right padding."""
    model = {"llama": llama, "qwen2": qwen2, "gemma3": gemma3}[which]
    report = validate(model, export_onnx(model, tmp_path / "m.onnx"))
    assert report.exact.reference == "fp32"
    assert report.exact.max_abs_diff <= 1e-4
    assert report.exact.top1_agreement == 1.0


@pytest.mark.parametrize("n_in,n_cr", [(4, 0), (0, 0), (0, 4)], ids=["all-in", "all-or", "all-cr"])
def test_each_mask_kind_alone(n_in: int, n_cr: int, tmp_path: Path) -> None:
    model = tiny_llama(n_in, n_cr)
    path = export_onnx(model, tmp_path / "m.onnx")
    assert validate(model, path).exact.max_abs_diff <= 1e-4
    # the graph reads the mask it claims to: the other kinds' masks change the logits
    kind = model.schedule.kinds[0]
    steps = sample_steps(128)
    other = "or" if kind != "or" else "in"
    swapped = [Step(s.input_ids, s.position_ids, {kind: s.masks[other]}, s.valid) for s in steps]
    base = run_steps(OnnxBackend(path, threads=1), steps)
    assert np.abs(run_steps(OnnxBackend(path, threads=1), swapped)[0] - base[0]).max() > 1e-3


def test_nf4_bytes_and_parity_with_bitsandbytes(llama: HatLLM, exported: dict[str, Path]) -> None:
    bnbf = pytest.importorskip("bitsandbytes.functional")  # only the NF4 reference needs it
    model = onnx.load(str(exported["nf4"]))
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    reference = tiny_llama()  # same seed, same weights; bitsandbytes dequantises independently
    with torch.no_grad():
        for i in range(4):
            for name in LINEARS:
                path = f"model.layers.{i}.{name}"
                w = reference.lm.get_parameter(f"{path}.weight")
                packed, state = bnbf.quantize_4bit(w.detach().clone(), blocksize=64, quant_type="nf4",
                                                   compress_statistics=False)
                assert np.array_equal(arrays[f"{path}.weight.nf4"], packed.numpy().reshape(-1))
                assert np.array_equal(arrays[f"{path}.weight.absmax"], state.absmax.numpy())
                w.copy_(bnbf.dequantize_4bit(packed, state))
    steps = sample_steps(128)
    parity = compare("bitsandbytes", run_steps(OnnxBackend(exported["nf4"], threads=1, compute="native"), steps),
                     run_torch(reference, steps), steps)
    assert parity.max_abs_diff <= 1e-4 * max(1.0, parity.logit_scale)
    assert parity.top1_agreement == 1.0


def test_nf4_double_quantised_absmax_is_expanded() -> None:
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(32, 128)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert state.nested
    ours = nf4_unpack(packed.numpy().reshape(-1), nf4_absmax(state), 32, 128)
    assert np.allclose(ours, bnbf.dequantize_4bit(packed, state).numpy(), atol=1e-6)
    packed_np, absmax = nf4_pack(w.numpy())
    assert packed_np.shape == (32 * 128 // 2,) and absmax.shape == (32 * 128 // 64,)


def test_int4_weights_within_one_step_and_logits_close(llama: HatLLM, exported: dict[str, Path]) -> None:
    model = onnx.load(str(exported["int4"]))
    bits = {n.name: onnx.helper.get_attribute_value(n.attribute[[a.name for a in n.attribute].index("bits")])
            for n in model.graph.node if n.op_type == "MatMulNBits"}
    # defaults: the down projections, the head and the embedding (untied here) in 8 bits
    assert sorted(bits.values()) == [4] * (4 * (len(LINEARS) - 1)) + [8] * 5
    assert bits["/lm_head/MatMulNBits"] == 8
    weights = dequantized_linears(model)
    assert len(weights) == 4 * len(LINEARS) + 2
    for name, deq in weights.items():
        w = llama.lm.get_parameter(name).detach().numpy()
        if name in ("model.embed_tokens.weight", "lm_head.weight") or "down_proj" in name:
            block = 64 if w.shape[1] % 64 == 0 else 32  # 8-bit symmetric: within half a step
            step = np.abs(w.reshape(w.shape[0], -1, block)).max(-1) / 127
            assert (np.abs(deq - w).reshape(step.shape + (block,)) <= step[..., None] * 0.501).all(), name
            continue
        blocks = w.reshape(w.shape[0], -1, 16)
        step = (blocks.max(-1) - np.minimum(blocks.min(-1), 0) + 1e-12) / 15  # asymmetric RTN step
        assert (np.abs(deq - w).reshape(blocks.shape) <= step[..., None] * 1.001).all(), name
    report = validate(llama, exported["int4"])
    exact, fp32 = report.parities
    assert exact.reference == "dequantized" and exact.rel_diff <= 1e-4
    # a random tiny model has near-tied logits, so agreement is a weak figure here; the bound is
    # the quantisation error itself (~8% RMS per weight for 4-bit RTN, block 32): measured rel
    # 0.14, top-1 0.93, top-5 0.88
    assert fp32.rel_diff <= 0.2 and fp32.top1_agreement >= 0.85 and fp32.top5_overlap >= 0.8


def test_int4_of_a_tied_model_shares_one_8bit_embedding_and_head(qwen2: HatLLM, tmp_path: Path) -> None:
    """SmolLM2's layout: the embedding and the head are one tensor, written once in 8 bits and
    read by both the embedding's Gather and the head's MatMulNBits."""
    path = export_onnx(qwen2, tmp_path / "q.onnx", quant="int4")
    graph = onnx.load(str(path)).graph
    users = {n.name: list(n.input) for n in graph.node}
    assert "model.embed_tokens.weight.q8" in users["/model/embed_tokens/Gather"]
    assert users["/lm_head/MatMulNBits"][1:3] == ["model.embed_tokens.weight.q8", "model.embed_tokens.weight.scales"]
    assert not [t.name for t in graph.initializer if t.name.startswith("lm_head")]
    exact, fp32 = validate(qwen2, path).parities
    assert exact.reference == "dequantized" and exact.rel_diff <= 1e-4
    assert fp32.rel_diff <= 0.2


@pytest.mark.parametrize("algo", ["hqq", "gptq"])
def test_int4_other_algorithms_match_their_weights(algo: str, llama: HatLLM, tmp_path: Path) -> None:
    segments = np.repeat(np.arange(4), 6)  # template, then three items of 6 tokens: every mask kind differs
    options = Int4Options(algo=algo, calibration=((np.arange(24) % 128, segments), (np.arange(16) * 5 % 128, segments[:16])))
    path = export_onnx(llama, tmp_path / "m.onnx", quant="int4", int4=options)
    assert validate(llama, path).exact.rel_diff <= 1e-4


def test_fp16_graph_runs_and_tracks_fp32(llama: HatLLM, tmp_path: Path) -> None:
    path = export_onnx(llama, tmp_path / "m.onnx", dtype="fp16")
    backend = OnnxBackend(path, threads=1, compute="native")
    assert backend.cache_dtype == np.float16
    report = validate(llama, path)
    assert report.exact.rel_diff <= 5e-3 and report.exact.top1_agreement == 1.0


def test_external_data_round_trip(llama: HatLLM, exported: dict[str, Path], tmp_path: Path) -> None:
    path = export_onnx(llama, tmp_path / "m.onnx", external_data=True)
    assert (tmp_path / "m.onnx.data").stat().st_size > path.stat().st_size
    steps = sample_steps(128)
    a = run_steps(OnnxBackend(path, threads=1, compute="native"), steps)
    b = run_steps(OnnxBackend(exported["none"], threads=1), steps)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_gemma3_graph_slides_its_local_layers_only(gemma3: HatLLM, tmp_path: Path) -> None:
    """The window reaches the local layers' masks (a global window would change the logits) and
    the int4 bundle of a Gemma3 model tracks PyTorch like a Llama one."""
    model = onnx.load(str(export_onnx(gemma3, tmp_path / "m.onnx")))
    attention = [n for n in model.graph.node if n.op_type == "Attention"]
    assert [n.input[3] for n in attention] == ["/model/sliding_in/And/output_0", "/model/sliding_or/And/output_0",
                                               "/model/sliding_or/And/output_0", "mask_cr"]
    assert {"Gelu", "Less"} <= {n.op_type for n in model.graph.node}
    assert "key_positions" in {i.name for i in model.graph.input}
    wide = tiny_gemma3(window=64)
    steps = sample_steps(128)
    near = run_steps(OnnxBackend(export_onnx(gemma3, tmp_path / "a.onnx"), threads=1), steps)
    far = run_steps(OnnxBackend(export_onnx(wide, tmp_path / "b.onnx"), threads=1), steps)
    assert np.abs(near[0] - far[0]).max() > 1e-3
    exact, _ = validate(gemma3, export_onnx(gemma3, tmp_path / "q.onnx", quant="int4")).parities
    assert exact.reference == "dequantized" and exact.rel_diff <= 1e-4


def test_gemma3_window_counts_positions_in_a_side_by_side_step(gemma3: HatLLM, tmp_path: Path) -> None:
    """A beam step's hypotheses sit side by side: 3 queries at one position, each seeing the
    prompt and itself. ONNX Runtime and PyTorch cut the 4-position window alike, and a query's
    logits are those of the same token fed alone (its columns run ahead of its position)."""
    from hatllm_edge.core.masks import build_masks, causal_visibility
    from hatllm_edge.training.torch_backend import TorchBackend

    rng = np.random.default_rng(5)
    ids, segs = rng.integers(0, 128, (1, 10)), np.zeros((1, 10), np.int64)
    prompt = build_masks(segs, segs, causal_visibility(np.ones((1, 10), bool), 10))
    visible = np.zeros((1, 3, 13), bool)
    visible[:, :, :10] = True
    visible[0, [0, 1, 2], [10, 11, 12]] = True
    step_ids, step_pos = rng.integers(0, 128, (1, 3)), np.full((1, 3), 10)
    step = build_masks(np.zeros((1, 3), np.int64), np.zeros((1, 13), np.int64), visible)
    onnx_backend = OnnxBackend(export_onnx(gemma3, tmp_path / "m.onnx"), threads=1)
    results = []
    for backend in (onnx_backend, TorchBackend(gemma3)):
        _, cache = backend.forward(ids, np.arange(10)[None], prompt, None)
        side_by_side, _ = backend.forward(step_ids, step_pos, step, cache)
        alone = [backend.forward(step_ids[:, j:j + 1], step_pos[:, :1],
                                 build_masks(np.zeros((1, 1), np.int64), np.zeros((1, 11), np.int64),
                                             causal_visibility(np.ones((1, 11), bool), 1)), cache)[0][0, 0]
                 for j in range(3)]
        np.testing.assert_allclose(side_by_side[0], np.stack(alone), atol=1e-4)
        results.append(side_by_side)
    np.testing.assert_allclose(results[0], results[1], atol=1e-4)


def test_a_gemma3_graph_that_slides_on_cache_slots_is_refused(gemma3: HatLLM, tmp_path: Path) -> None:
    """A Gemma3 graph without key_positions (an older export, whose window counted cache slots)
    is refused with the way out, not run with the wrong window."""
    proto = onnx.load(str(export_onnx(gemma3, tmp_path / "m.onnx")))
    kept = [i for i in proto.graph.input if i.name != "key_positions"]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    for node in proto.graph.node:
        node.input[:] = ["position_ids" if n == "key_positions" else n for n in node.input]
    onnx.save(proto, str(tmp_path / "old.onnx"))
    with pytest.raises(InputError, match="cache slots .* export it again"):
        OnnxBackend(tmp_path / "old.onnx", threads=1)


def test_refuses_what_it_cannot_export(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="hidden_act"):
        export_onnx(tiny_llama(hidden_act="gelu"), tmp_path / "m.onnx")
    with pytest.raises(InputError, match="opset"):
        export_onnx(tiny_llama(), tmp_path / "m.onnx", opset=21)
    with pytest.raises(InputError, match="GPTQ needs calibration"):
        export_onnx(tiny_llama(), tmp_path / "m.onnx", quant="int4", int4=Int4Options(algo="gptq"))
    assert not (tmp_path / "m.onnx").exists()


@pytest.fixture(scope="module")
def bundle(tokenizer_json: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An nf4 bundle with a real tokenizer and catalog, so that export calibrates the int8 route."""
    torch.manual_seed(0)
    llama = HatLLM(LlamaForCausalLM(tiny_llama_config(layers=4)).eval(), LayerSchedule(4, 1, 1))
    root = tmp_path_factory.mktemp("bundles")
    (root / "catalog.jsonl").write_text('{"item_id": "1", "title": "A"}\n')
    files = {"tokenizer.json": tokenizer_json, "catalog.jsonl": root / "catalog.jsonl"}
    return export_bundle(llama, root / "out", "nf4", files, model_meta(llama), progress=False)


def test_gptq_export_calibrates_on_the_bundles_prompts(tokenizer_json: Path, tmp_path: Path,
                                                       capfd: pytest.CaptureFixture[str]) -> None:
    """export_bundle builds GPTQ's calibration prompts from the bundle's tokenizer and catalog
    (what 'hatllm-edge export --int4-algo gptq' relies on), and each reaches the quantiser with
    its HatLLM masks, not a plain causal one; its progress bar stays off stdout (the command's JSON)."""
    from hatllm_edge.export.quant import int4 as int4_module

    fed: list[dict[str, np.ndarray]] = []
    feed = int4_module._TokenReader._feed
    torch.manual_seed(0)
    # 64 wide: ONNX Runtime's GPTQ packs zero points in pairs, so a weight needs an even count of blocks
    llama = HatLLM(LlamaForCausalLM(tiny_llama_config(layers=4, hidden=64)).eval(), LayerSchedule(4, 1, 1))
    (tmp_path / "catalog.jsonl").write_text('{"item_id": "1", "title": "Alpha (1990)"}\n{"item_id": "2", "title": "Beta (1991)"}\n')
    files = {"tokenizer.json": tokenizer_json, "catalog.jsonl": tmp_path / "catalog.jsonl"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(int4_module._TokenReader, "_feed", lambda self, seq: fed.append(feed(self, seq)) or fed[-1])
        out = export_bundle(llama, tmp_path / "out", "int4", files, model_meta(llama), progress=False,
                            int4=Int4Options(algo="gptq", block_size=32))
    assert capfd.readouterr().out == ""
    export = json.loads((out / "bundle.json").read_text())["export"]
    assert export["int4"]["algo"] == "gptq" and export["int4"]["calibration_prompts"] == len(fed) > 0
    assert export["validation"]["dequantized"]["rel_diff"] <= 1e-4
    assert any(not np.array_equal(f["mask_in"], f["mask_or"]) for f in fed)
    assert any(not np.array_equal(f["mask_cr"], f["mask_or"]) for f in fed)


def test_bundle_contents_and_manifest(bundle: Path) -> None:
    names = sorted(p.name for p in bundle.iterdir())
    assert names == ["bundle.json", "catalog.jsonl", "manifest.json", "model.onnx", "tokenizer.json"]
    manifest = json.loads((bundle / "manifest.json").read_text())["files"]
    assert sorted(manifest) == [n for n in names if n != "manifest.json"]
    for name, entry in manifest.items():
        assert entry == {"sha256": file_sha256(bundle / name), "size": (bundle / name).stat().st_size}
    info = json.loads((bundle / "bundle.json").read_text())
    assert info["schedule"] == {"num_layers": 4, "n_in": 1, "n_cr": 1} and info["prompt"]["template"] == "list"
    export = info["export"]
    assert export["calibration"] is not None  # the prompts were built from the bundle's tokenizer and catalog
    assert export["quant"] == "nf4" and export["layer_kinds"] == ["in", "or", "or", "cr"]
    assert export["validation"]["dequantized"]["rel_diff"] <= 1e-4 and "onnxruntime" in export["versions"]
    meta = OnnxBackend.from_bundle(bundle, threads=1).metadata
    assert meta["hatllm.file.tokenizer.json.sha256"] == manifest["tokenizer.json"]["sha256"]
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_int8_graph_is_cached_by_bundle_content(bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The int8 route's expanded graph is written to the cache on the first load and read back,
    not expanded again, on the next (same outputs). Other activations are another entry; no
    entry without checked hashes; the native route writes none."""
    import hatllm_edge.engine.int8 as int8_route

    monkeypatch.setenv("HATLLM_CACHE", str(tmp_path / "cache"))
    steps = sample_steps(128)
    OnnxBackend.from_bundle(bundle, threads=1, compute="native")
    assert not (tmp_path / "cache").exists()
    first = OnnxBackend.from_bundle(bundle, threads=1)  # auto: an nf4 bundle on the CPU computes in int8
    entries = list((tmp_path / "cache" / "int8").glob("*.onnx"))
    assert first.compute == "int8" and len(entries) == 1 and entries[0].suffix == ".onnx"

    def no_expansion(*args: object, **kwargs: object) -> None:
        raise AssertionError("expanded again")

    monkeypatch.setattr(int8_route, "int8_compute", no_expansion)
    second = OnnxBackend.from_bundle(bundle, threads=1)
    assert second.compute == "int8"
    for a, b in zip(run_steps(first, steps), run_steps(second, steps)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(AssertionError, match="expanded again"):
        OnnxBackend.from_bundle(bundle, threads=1, compute="int8-tensor")  # per-tensor: its own entry
    with pytest.raises(AssertionError, match="expanded again"):
        OnnxBackend.from_bundle(bundle, threads=1, verify=False)  # unchecked content: no cache


def test_verify_bundle_finds_tampering(bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in bundle.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    verify_bundle(copy)
    data = bytearray((copy / "catalog.jsonl").read_bytes())
    data[0] ^= 1
    (copy / "catalog.jsonl").write_bytes(bytes(data))
    with pytest.raises(InputError, match="catalog.jsonl does not match its sha256"):
        verify_bundle(copy)
    (copy / "tokenizer.json").write_bytes(b"{}")
    with pytest.raises(InputError, match="tokenizer.json has 2 bytes"):
        OnnxBackend.from_bundle(copy, verify=False)


def test_bundle_refuses_non_empty_out_unless_overwrite(llama: HatLLM, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        export_bundle(llama, out, "none", {}, model_meta(llama), progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    export_bundle(llama, out, "none", {}, model_meta(llama), progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_export_leaves_no_bundle_and_keeps_model(llama: HatLLM, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(InputError, match="is not a file"):
        export_bundle(llama, tmp_path / "a", "none", {"catalog.jsonl": tmp_path / "missing"}, model_meta(llama), progress=False)

    def broken(*args: object, **kwargs: object) -> None:
        raise HatLLMError("validation blew up")

    monkeypatch.setattr("hatllm_edge.export.bundle.validate", broken)
    with pytest.raises(HatLLMError, match="blew up"):
        export_bundle(llama, tmp_path / "b", "int4", {}, model_meta(llama), progress=False)
    assert list(tmp_path.iterdir()) == []
    after = llama.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_int8_export_matches_its_weights(llama: HatLLM, tmp_path: Path) -> None:
    """--quant int8: every Linear and the head as 8-bit MatMulNBits (zero point 128 implied),
    reproduced by the PyTorch model holding the dequantised weights."""
    path = export_onnx(llama, tmp_path / "m.onnx", quant="int8")
    model = onnx.load(str(path))
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 * len(LINEARS) + 1
    assert all(a.i == 8 for n in nbits for a in n.attribute if a.name == "bits")
    report = validate(llama, path)
    assert report.exact.reference == "dequantized" and report.exact.rel_diff <= 1e-4
    assert report.parities[1].top1_agreement >= 0.9  # 8 bits barely move a random model


def test_8bit_embedding_and_head_save_most_of_their_float_bytes(llama: HatLLM, exported: dict[str, Path], tmp_path: Path) -> None:
    """The 8-bit embedding and head (a fifth of SmolLM2-135M) are what bring the 4-bit bundle
    under 30% of fp32 (README); here: they take at most ~30% of their float bytes."""
    float_head = export_onnx(llama, tmp_path / "f.onnx", quant="int4", embeddings="float").stat().st_size
    float_bytes = 4 * (llama.lm.model.embed_tokens.weight.numel() + llama.lm.lm_head.weight.numel())
    assert float_head - exported["int4"].stat().st_size >= 0.7 * float_bytes
    with pytest.raises(InputError, match="embeddings 'int4'"):
        export_onnx(llama, tmp_path / "x.onnx", quant="int4", embeddings="int4")  # type: ignore[arg-type]


def test_int4_keeps_the_named_linears_at_8_bits(llama: HatLLM, tmp_path: Path) -> None:
    options = Int4Options(eight_bit=("mlp.down_proj",))
    path = export_onnx(llama, tmp_path / "m.onnx", quant="int4", int4=options)
    bits = {n.name: [a.i for a in n.attribute if a.name == "bits"][0] for n in onnx.load(str(path)).graph.node
            if n.op_type == "MatMulNBits"}
    assert {name for name, b in bits.items() if b == 8} == {f"/model/layers.{i}/mlp/down_proj/MatMulNBits" for i in range(4)} | {"/lm_head/MatMulNBits"}
    assert sum(b == 4 for b in bits.values()) == 4 * (len(LINEARS) - 1)
    assert validate(llama, path).exact.rel_diff <= 1e-4
    with pytest.raises(InputError, match="8-bit Linears \\['down_proj'\\]"):
        export_onnx(llama, tmp_path / "x.onnx", quant="int4", int4=Int4Options(eight_bit=("down_proj",)))
