"""OnnxBackend: behaves like HatLLM.forward (cache, select, last_only), checks its inputs,
refuses CUDA without CUDA, and needs no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hatllm_edge.core.errors import InputError
from hatllm_edge.core.formats import GRAPH_CONTRACT, GRAPH_REVISION
from hatllm_edge.core.masks import LayerSchedule, build_masks, causal_visibility
from hatllm_edge.engine.session import PROFILE_ENV, OnnxBackend
from hatllm_edge.export import export_onnx
from hatllm_edge.export.validate import run_steps, sample_steps
from hatllm_edge.training.model import HatLLM

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def model() -> HatLLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)
    return HatLLM(LlamaForCausalLM(cfg).eval(), LayerSchedule(4, 1, 1))


@pytest.fixture(scope="module")
def onnx_path(model: HatLLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(model, tmp_path_factory.mktemp("engine") / "model.onnx")


@pytest.fixture(scope="module")
def backend(onnx_path: Path) -> OnnxBackend:
    return OnnxBackend(onnx_path, threads=1)


def _step_masks(segments: np.ndarray, key_valid: np.ndarray, q: int) -> dict[str, np.ndarray]:
    return build_masks(segments[:, -q:], segments, causal_visibility(key_valid, q))


def test_metadata_and_load_time(backend: OnnxBackend) -> None:
    assert backend.layer_kinds == ["in", "or", "or", "cr"]
    assert backend.mask_kinds == ["in", "or", "cr"]
    assert backend.metadata["hatllm.model_type"] == "llama"
    assert backend.metadata["hatllm.graph_contract"] == str(GRAPH_CONTRACT)
    assert backend.metadata["hatllm.graph_revision"] == str(GRAPH_REVISION)
    assert 0 < backend.load_seconds < 30
    assert (backend.num_kv_heads, backend.head_dim) == (2, 16)


def test_forward_select_and_cached_step_match_pytorch(model: HatLLM, backend: OnnxBackend) -> None:
    """Prefill 2 rows, then a cached step of 3 beams that names its parent rows: as beam search does."""
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 128, (2, 6))
    seg = rng.integers(0, 3, (2, 6))
    valid = np.ones((2, 6), bool)
    valid[1, :2] = False  # left padding
    pos = np.maximum(np.cumsum(valid, 1) - 1, 0)
    masks = _step_masks(seg, valid, 6)
    logits, cache = backend.forward(ids, pos, masks, None)
    with torch.no_grad():
        t_logits, t_cache = model(torch.from_numpy(ids), torch.from_numpy(pos),
                                  {k: torch.from_numpy(m) for k, m in masks.items()}, use_cache=True)
    assert logits.dtype == np.float32 and logits.shape == (2, 6, 128)
    assert np.abs(logits - t_logits.numpy()).max() <= 1e-4
    for (k, v), (tk, tv) in zip(backend.cache_arrays(cache), t_cache):
        assert np.abs(k - tk.numpy()).max() <= 1e-5 and np.abs(v - tv.numpy()).max() <= 1e-5

    index = np.array([1, 0, 1])
    runs = backend.runs
    t_cache = [(k[torch.from_numpy(index)], v[torch.from_numpy(index)]) for k, v in t_cache]
    new_ids = rng.integers(0, 128, (3, 1))
    key_valid = np.concatenate([valid[index], np.ones((3, 1), bool)], 1)
    seg = np.concatenate([seg[index], np.full((3, 1), 3)], 1)
    masks = _step_masks(seg, key_valid, 1)
    new_pos = key_valid.sum(1, keepdims=True) - 1
    last, cache = backend.forward(new_ids, new_pos, masks, cache, last_only=True, rows=index)
    with torch.no_grad():
        t_last, _ = model(torch.from_numpy(new_ids), torch.from_numpy(new_pos),
                          {k: torch.from_numpy(m) for k, m in masks.items()}, past=t_cache, use_cache=True)
    assert last.shape == (3, 128) and (cache.batch, cache.length) == (3, 7)
    assert backend.runs == runs + 1  # the reorder is part of the step, not a run of its own
    assert np.abs(last - t_last[:, -1].numpy()).max() <= 1e-4


def test_last_only_equals_last_position_of_full(backend: OnnxBackend) -> None:
    s = sample_steps(128)[0]
    full, _ = backend.forward(s.input_ids, s.position_ids, s.masks, None)
    last, cache = backend.forward(s.input_ids, s.position_ids, s.masks, None, last_only=True)
    assert np.array_equal(last, full[:, -1]) and cache.length == s.input_ids.shape[1]


def test_the_profiler_knob_writes_every_nodes_time(onnx_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$HATLLM_ORT_PROFILE turns ONNX Runtime's profiler on: one event per executed node, the
    model's attention among them (what scripts/op_profile.py sums)."""
    monkeypatch.setenv(PROFILE_ENV, str(tmp_path / "ort"))
    profiled = OnnxBackend(onnx_path, threads=1)
    s = sample_steps(128)[0]
    profiled.forward(s.input_ids, s.position_ids, s.masks, None)
    written = Path(profiled.session.end_profiling())
    assert written.parent == tmp_path and written.name.startswith("ort")
    events = json.loads(written.read_text())
    ops = {e["args"]["op_name"] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")}
    assert "Attention" in ops and len(ops) > 5
    monkeypatch.delenv(PROFILE_ENV)
    assert OnnxBackend(onnx_path, threads=1).session.end_profiling() == ""  # off unless asked: it costs time


def test_rejects_bad_inputs(backend: OnnxBackend) -> None:
    s = sample_steps(128)[0]
    with pytest.raises(InputError, match="mask kind 'cr' is missing"):
        backend.forward(s.input_ids, s.position_ids, {"in": s.masks["in"], "or": s.masks["or"]}, None)
    with pytest.raises(InputError, match="mask_in has shape"):
        backend.forward(s.input_ids, s.position_ids, {k: m[:, :, :, 1:] for k, m in s.masks.items()}, None)
    _, cache = backend.forward(s.input_ids, s.position_ids, s.masks, None)
    step = {k: np.ones((1, 1, 1, s.input_ids.shape[1] + 1), bool) for k in s.masks}
    with pytest.raises(InputError, match="pass the cache rows it continues"):
        backend.forward(s.input_ids[:1, :1], s.position_ids[:1, :1], step, cache)
    with pytest.raises(InputError, match="out of range"):
        backend.forward(s.input_ids[:1, :1], s.position_ids[:1, :1], step, cache, rows=np.array([9]))
    with pytest.raises(InputError, match="rows has 2 entries"):
        backend.forward(s.input_ids[:1, :1], s.position_ids[:1, :1], step, cache, rows=np.array([0, 0]))
    with pytest.raises(InputError, match="no such file"):
        OnnxBackend("/nonexistent/model.onnx")


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is available here; the refusal applies without it")
def test_cuda_without_cuda_is_an_input_error(onnx_path: Path) -> None:
    with pytest.raises(InputError, match="onnxruntime-gpu with a CUDA GPU is needed for --device cuda"):
        OnnxBackend(onnx_path, device="cuda")


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA GPU")
def test_cuda_matches_cpu(onnx_path: Path, backend: OnnxBackend) -> None:
    gpu = OnnxBackend(onnx_path, device="cuda")
    steps = sample_steps(128)
    cpu_cache = gpu_cache = None
    for s in steps:
        a, cpu_cache = backend.forward(s.input_ids, s.position_ids, s.masks, cpu_cache)
        b, gpu_cache = gpu.forward(s.input_ids, s.position_ids, s.masks, gpu_cache)
        assert np.abs(a - b).max() <= 1e-3
    assert gpu_cache.values[0].device_name() == "cuda"
    s = steps[-1]
    step = {k: np.ones((2, 1, 1, gpu_cache.length + 1), bool) for k in s.masks}
    ids, pos = s.input_ids[:2, :1], s.position_ids[:2, -1:] + 1
    a, _ = backend.forward(ids, pos, step, cpu_cache, rows=np.array([2, 0]))
    b, gpu_cache = gpu.forward(ids, pos, step, gpu_cache, rows=np.array([2, 0]))
    assert np.abs(a - b).max() <= 1e-3 and gpu.cache_arrays(gpu_cache)[0][0].shape[0] == 2


def test_engine_runs_without_torch(onnx_path: Path) -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from hatllm_edge.engine.session import OnnxBackend\n"
        "from hatllm_edge.core.masks import build_masks, causal_visibility\n"
        f"b = OnnxBackend({str(onnx_path)!r}, threads=1)\n"
        "ids = np.arange(5)[None]; seg = np.zeros((1, 5), int)\n"
        "m = build_masks(seg, seg, causal_visibility(np.ones((1, 5), bool), 5))\n"
        "logits, cache = b.forward(ids, ids, m, None, last_only=True)\n"
        "assert logits.shape == (1, 128)\n"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60,
                            env={"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr


def test_token_logprobs_equal_log_softmax_of_the_logits(model: HatLLM, backend: OnnxBackend) -> None:
    """In-graph log p(target) = log_softmax(logits)[target], on the engine and in PyTorch."""
    from hatllm_edge.ranking.scoring import log_softmax
    from hatllm_edge.training.torch_backend import TorchBackend

    s = sample_steps(128)[0]
    targets = np.random.default_rng(5).integers(0, 128, s.input_ids.shape)
    logits, _ = backend.forward(s.input_ids, s.position_ids, s.masks, None)
    want = np.take_along_axis(log_softmax(logits), targets[..., None], axis=2)[..., 0]
    got, cache = backend.token_logprobs(s.input_ids, s.position_ids, s.masks, None, targets)
    assert got.shape == targets.shape and np.abs(got - want).max() <= 1e-5
    assert cache.length == s.input_ids.shape[1]
    torch_got, _ = TorchBackend(model).token_logprobs(s.input_ids, s.position_ids, s.masks, None, targets)
    assert np.abs(torch_got - want).max() <= 1e-4
    with pytest.raises(InputError, match="targets"):
        backend.token_logprobs(s.input_ids, s.position_ids, s.masks, None, targets[:, 1:])


@pytest.mark.parametrize("quant", ["none", "int4", "int8"])
def test_int8_compute_replaces_every_weight_matmul_and_tracks_native(model: HatLLM, tmp_path: Path, quant: str) -> None:
    """compute="int8": every weight matmul (LM head included) becomes a u8 x s8
    MatMulIntegerToFloat with per-token activation scales at load ("int8-tensor":
    DynamicQuantizeMatMul); the logits stay close to the graph as stored."""
    import onnx

    from hatllm_edge.engine.int8 import INT8_OP, int8_compute

    path = export_onnx(model, tmp_path / f"{quant}.onnx", quant=quant)
    for activations, op in (("row", "MatMulIntegerToFloat"), ("tensor", INT8_OP)):
        rewritten, changed = int8_compute(onnx.load(str(path)), activations)  # type: ignore[arg-type]
        ops = [n.op_type for n in rewritten.graph.node]
        assert changed == 4 * 7 + 1 and ops.count(op) == changed
        assert not {"MatMulNBits", "MatMulBnb4", "Gemm"} & set(ops) and "MatMul" not in ops
    native = OnnxBackend(path, threads=1, compute="native")
    fast = OnnxBackend(path, threads=1, compute="int8")
    assert (native.compute, fast.compute) == ("native", "int8")
    assert OnnxBackend(path, threads=1).compute == ("native" if quant == "none" else "int8")  # auto
    steps = sample_steps(128)
    for a, b in zip(run_steps(native, steps), run_steps(fast, steps)):
        assert np.abs(a - b).max() <= 0.05 * np.abs(a).max()  # int8 weights and activations
    with pytest.raises(InputError, match="CPU route"):
        OnnxBackend(path, device="cuda", compute="int8")
    with pytest.raises(InputError, match="compute 'fast'"):
        OnnxBackend(path, compute="fast")  # type: ignore[arg-type]


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_int8_block_runs_the_stored_weights_on_int8_kernels(model: HatLLM, tmp_path: Path, quant: str) -> None:
    """compute="int8-block": every MatMulNBits (LM head included) keeps its weights and gets
    accuracy_level 4, nothing else changes; the logits stay close to the graph as stored, and
    a row's logits are the same alone or in a batch (activations are quantised per row)."""
    import onnx

    from hatllm_edge.engine.int8 import block_compute

    path = export_onnx(model, tmp_path / f"{quant}.onnx", quant=quant)
    stored = onnx.load(str(path))
    rewritten, changed = block_compute(stored)
    nbits = [n for n in rewritten.graph.node if n.op_type == "MatMulNBits"]
    assert changed == len(nbits) == 4 * 7 + 1
    assert all({a.name: a.i for a in n.attribute}["accuracy_level"] == 4 for n in nbits)
    assert [n.op_type for n in rewritten.graph.node] == [n.op_type for n in stored.graph.node]
    assert list(rewritten.graph.initializer) == list(stored.graph.initializer)
    native = OnnxBackend(path, threads=1, compute="native")
    block = OnnxBackend(path, threads=1, compute="int8-block")
    assert block.compute == "int8-block" and block.exact_layout
    steps = sample_steps(128)
    for a, b in zip(run_steps(native, steps), run_steps(block, steps)):
        assert 0 < np.abs(a - b).max() <= 0.05 * np.abs(a).max()  # int8 activations, per block
    s = steps[0]
    alone, _ = block.forward(s.input_ids[:1], s.position_ids[:1], {k: m[:1] for k, m in s.masks.items()}, None)
    batched, _ = block.forward(s.input_ids, s.position_ids, s.masks, None)
    assert np.abs(alone[0] - batched[0]).max() <= 1e-5
    with pytest.raises(InputError, match="CPU route"):
        OnnxBackend(path, device="cuda", compute="int8-block")


def test_int8_block_needs_nbits_weights_and_is_auto_for_gemma_int4_and_int8_only(model: HatLLM, tmp_path: Path) -> None:
    """int8-block on a graph without MatMulNBits (nf4, float) would change nothing: refused. Auto
    takes it for Gemma 3's int4/int8 bundles on the CPU only; bench names it ort-<quant>-block."""
    from hatllm_edge.bench.backends import ort_backend
    from hatllm_edge.engine.backend import resolve_compute

    with pytest.raises(InputError, match="int8-block runs MatMulNBits weights"):
        OnnxBackend(export_onnx(model, tmp_path / "nf4.onnx", quant="nf4"), threads=1, compute="int8-block")
    gemma = "gemma3_text"
    assert [resolve_compute("auto", "cpu", q, gemma) for q in ("int4", "int8", "nf4", "none")] == \
        ["int8-block", "int8-block", "int8", "native"]
    assert resolve_compute("auto", "cuda", "int8", gemma) == "native" and resolve_compute("auto", "cpu", "int8", "llama") == "int8"
    assert ort_backend("ort-int8-block") == ("int8", "fp32", "int8-block")


def test_int8_rows_make_a_token_independent_of_its_batch(onnx_path: Path) -> None:
    """Per-token activation scales: a row's logits are the same alone or beside a row of
    other tokens; with one scale per tensor (DynamicQuantizeMatMul) they are not."""
    s = sample_steps(128, batch=3)[0]
    rows = {}
    for compute in ("int8", "int8-tensor"):
        b = OnnxBackend(onnx_path, threads=1, compute=compute)  # type: ignore[arg-type]
        alone, _ = b.forward(s.input_ids[:1], s.position_ids[:1], {k: m[:1] for k, m in s.masks.items()}, None)
        batched, _ = b.forward(s.input_ids, s.position_ids, s.masks, None)
        rows[compute] = float(np.abs(alone[0] - batched[0]).max())
    assert rows["int8"] <= 1e-5 < rows["int8-tensor"]


def test_a_bundle_of_an_older_graph_contract_is_refused(model: HatLLM, tmp_path: Path) -> None:
    """A graph without target_ids (as exported before contract 2) gets a clear error."""
    import onnx

    proto = onnx.load(str(export_onnx(model, tmp_path / "m.onnx")))
    old = [i for i in proto.graph.input if i.name != "target_ids"]
    del proto.graph.input[:]
    proto.graph.input.extend(old)
    for node in proto.graph.node:  # feed the removed input from a constant, as a valid old-style graph
        node.input[:] = ["position_ids" if n == "target_ids" else n for n in node.input]
    onnx.save(proto, str(tmp_path / "old.onnx"))
    with pytest.raises(InputError, match="older hatllm-edge; export it again"):
        OnnxBackend(tmp_path / "old.onnx", compute="native")


def test_candidate_passes_hold_as_many_logits_whatever_the_vocabulary() -> None:
    """The tuned pass size is for a 49,152-token vocabulary; Gemma 3's 262,144 tokens get fewer
    tokens a pass, so its logits take no more memory; a smaller vocabulary keeps the budget."""
    from hatllm_edge.engine.backend import (
        PASS_TOKENS_CPU,
        PASS_TOKENS_CUDA,
        pass_tokens,
    )

    assert pass_tokens("cpu", 49152) == PASS_TOKENS_CPU and pass_tokens("cuda", 49152) == PASS_TOKENS_CUDA
    assert pass_tokens("cpu", 262144) == 768 and pass_tokens("cpu", 128) == PASS_TOKENS_CPU
    assert pass_tokens("cpu", 262144) * 262144 <= PASS_TOKENS_CPU * 49152
