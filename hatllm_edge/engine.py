"""The ONNX Runtime backend: runs an exported HatLLM graph behind :class:`hatllm_edge.backend.Backend`.

No torch here, at import or at run time. One code path for CPU and CUDA: every step runs
through an IOBinding, the KV cache stays on the session's device as OrtValues (never copied
to NumPy between steps), only the logits come back to host memory. Beam reordering
(``select``) is a second tiny ONNX session (one Gather per cache tensor) on the same device.
Graph contract: :mod:`export.graph`. Bundle layout and its manifest: :func:`verify_bundle`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hatllm_edge.errors import InputError
from hatllm_edge.masks import MASK_KINDS, MaskKind

Compute = Literal["auto", "native", "int8", "int8-tensor"]
# The routes a user may pick. "int8-tensor" (one activation scale per batch tensor) is kept for
# the benchmark's ablation only: by design a user's scores there depend on who shares the batch.
COMPUTES: tuple[Compute, ...] = ("auto", "native", "int8")
Optimization = Literal["all", "basic", "none"]
MODEL_FILE = "model.onnx"
# The graph contract this engine reads (export.graph); bump it when the contract changes, so
# that bundles built on first use are rebuilt rather than reused.
GRAPH_CONTRACT = 2
# The revision of the graph export.graph writes: bumped when the graph changes within the
# contract (2: log-probs by LogSoftmax; 3: activation statistics for the int8 route), so cached
# bundles are rebuilt too. Kept here, not in export, so that finding a cached bundle does not
# import torch.
GRAPH_REVISION = 3
# The revision of the graph lowbit.int8_compute writes from a stored one: bumped when that
# rewrite changes (2: SmoothQuant folded in), so expanded graphs cached by an older engine are
# not reused.
INT8_REVISION = 2
REQUIRED_INPUTS = ("input_ids", "position_ids", "logits_to_keep", "target_ids")
BUNDLE_FILE = "bundle.json"
MANIFEST_FILE = "manifest.json"


def cache_root() -> Path:
    """Where bundles built on first use and the engine's int8-expanded graphs are kept:
    ``$HATLLM_CACHE``, else ``~/.cache/hatllm-edge``."""
    return Path(os.environ.get("HATLLM_CACHE", Path.home() / ".cache" / "hatllm-edge"))


def resolve_compute(compute: Compute, device: str, quantised: bool) -> Compute:
    """What "auto" means: int8 for a quantised graph on the CPU, the graph as stored otherwise."""
    if compute != "auto":
        return compute
    return "int8" if quantised and device == "cpu" else "native"


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` under a temporary name, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def verify_bundle(folder: Path, hashes: bool = True) -> dict[str, Any]:
    """Check every file the bundle's manifest lists: present, same size and (when ``hashes``)
    same sha256. Returns the manifest; raises InputError naming the first bad file."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"bundle {folder}: no readable {MANIFEST_FILE} ({e}); is this an exported bundle?") from e
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise InputError(f"bundle {folder}: {name} is missing; re-export or re-copy the bundle")
        if path.stat().st_size != entry["size"]:
            raise InputError(f"bundle {folder}: {name} has {path.stat().st_size} bytes, the manifest says "
                             f"{entry['size']}; the bundle is truncated or was modified")
        if hashes and file_sha256(path) != entry["sha256"]:
            raise InputError(f"bundle {folder}: {name} does not match its sha256 in {MANIFEST_FILE}; "
                             "the bundle is corrupt or was modified")
    return manifest


@dataclass(frozen=True)
class OrtCache:
    """The KV cache of one batch: OrtValues [B, kv_heads, P, head_dim] in graph-input order
    (layer 0 key, layer 0 value, layer 1 key, ...), on the session's device. Opaque to callers."""

    values: tuple[Any, ...]
    batch: int
    length: int


def _gather_model(num_values: int, elem_type: int, opset: int) -> bytes:
    """values.{j} [B, ...] + index [B'] -> values.{j}[index]: the cache's beam reorder."""
    from onnx import TensorProto, helper

    nodes, inputs, outputs = [], [helper.make_tensor_value_info("index", TensorProto.INT64, ["rows"])], []
    for j in range(num_values):
        shape = ["batch", "heads", "length", "dim"]
        inputs.append(helper.make_tensor_value_info(f"in.{j}", elem_type, shape))
        outputs.append(helper.make_tensor_value_info(f"out.{j}", elem_type, ["rows", "heads", "length", "dim"]))
        nodes.append(helper.make_node("Gather", [f"in.{j}", "index"], [f"out.{j}"], name=f"/select/{j}", axis=0))
    graph = helper.make_graph(nodes, "select_rows", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = helper.find_min_ir_version_for(model.opset_import)
    return model.SerializeToString()


class OnnxBackend:
    """One exported HatLLM graph in an ONNX Runtime session.

    device "cpu" (CPUExecutionProvider) or "cuda" (CUDAExecutionProvider, never a silent CPU
    fallback); ``threads`` fixes the intra-op thread count (None: ONNX Runtime's default).
    ``compute``: "native" runs the graph as stored; "int8" first expands every weight matmul
    to signed int8 with activations quantised per token (:func:`hatllm_edge.lowbit.int8_compute`,
    CPU only); "int8-tensor" the same with one activation scale per tensor
    (``DynamicQuantizeMatMul``: fewer ops, much less faithful); "auto" = int8 for a quantised
    graph on the CPU, native otherwise.
    ``optimization``: ONNX Runtime's graph optimisation level ("all", "basic" or "none").
    Exposes ``load_seconds``, ``metadata`` (the graph's metadata_props), ``layer_kinds`` and
    ``compute`` (what was chosen).
    """

    def __init__(self, onnx_path: Path | str, device: Literal["cpu", "cuda"] = "cpu",
                 threads: int | None = None, device_id: int = 0, compute: Compute = "auto",
                 optimization: Optimization = "all", cache_key: str | None = None) -> None:
        import onnxruntime as ort

        path = Path(onnx_path)
        if not path.is_file():
            raise InputError(f"ONNX model {path}: no such file")
        if threads is not None and threads < 1:
            raise InputError(f"threads must be >= 1, got {threads}")
        if compute not in (*COMPUTES, "int8-tensor"):
            raise InputError(f"compute {compute!r}: expected one of {COMPUTES}")
        if compute.startswith("int8") and device == "cuda":
            raise InputError(f"compute {compute} is a CPU route; use --compute native or auto on CUDA")
        if device == "cuda":
            available = ort.get_available_providers()
            if "CUDAExecutionProvider" not in available:
                raise InputError("onnxruntime-gpu with a CUDA GPU is needed for --device cuda; available "
                                 f"providers: {', '.join(available)}")
            providers: list[Any] = [("CUDAExecutionProvider", {"device_id": device_id})]
        elif device == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise InputError(f"device {device!r}: expected 'cpu' or 'cuda'")
        self.device, self.device_id = device, device_id

        levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
        if optimization not in levels:
            raise InputError(f"optimization {optimization!r}: expected one of {tuple(levels)}")
        options = ort.SessionOptions()
        options.graph_optimization_level = levels[optimization]
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        start = time.perf_counter()
        source: str | bytes = str(path)
        if compute == "auto" and device == "cuda":
            compute = "native"
        if compute != "native":
            source, compute = self._int8_source(path, compute, cache_key)
        self.compute: Compute = compute
        self.session = ort.InferenceSession(source, options, providers=providers)
        self.load_seconds = time.perf_counter() - start
        if device == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            # ORT falls back to CPU when the CUDA libraries fail to load; refuse that here
            raise InputError("onnxruntime could not start CUDAExecutionProvider (CUDA/cuDNN libraries "
                             f"missing?); session providers: {', '.join(self.session.get_providers())}")

        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        if "hatllm.layer_kinds" not in self.metadata:
            raise InputError(f"ONNX model {path} carries no hatllm.layer_kinds metadata; export it with hatllm-edge")
        self.layer_kinds: list[MaskKind] = json.loads(self.metadata["hatllm.layer_kinds"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        missing = [name for name in REQUIRED_INPUTS if name not in inputs]
        if missing:
            raise InputError(f"ONNX model {path} lacks the input(s) {missing} of graph contract {GRAPH_CONTRACT}: it was "
                             "exported by an older hatllm-edge; export it again (hatllm-edge export)")
        self.mask_kinds: list[MaskKind] = [k for k in MASK_KINDS if f"mask_{k}" in inputs]
        n = len(self.layer_kinds)
        self._past = [f"past_key_values.{i}.{p}" for i in range(n) for p in ("key", "value")]
        self._present = [f"present.{i}.{p}" for i in range(n) for p in ("key", "value")]
        past = inputs[self._past[0]]
        self.num_kv_heads, self.head_dim = int(past.shape[1]), int(past.shape[3])
        self.cache_dtype = np.float16 if past.type == "tensor(float16)" else np.float32
        from onnx import TensorProto

        elem = TensorProto.FLOAT16 if self.cache_dtype == np.float16 else TensorProto.FLOAT
        self._select = ort.InferenceSession(_gather_model(len(self._past), elem, 13), options, providers=providers)

    @staticmethod
    def _int8_source(path: Path, compute: Compute, cache_key: str | None) -> tuple[str | bytes, Compute]:
        """The graph to run for an int8 route ("auto" resolved by the stored graph's
        ``hatllm.quant``) and the route taken. The expansion costs seconds at every load, so
        with a ``cache_key`` (the bundle's verified content) it is kept under
        :func:`cache_root` and read back from there next time."""
        activations = "tensor" if compute == "int8-tensor" else "row"
        cached = None
        if cache_key is not None:
            digest = hashlib.sha256(f"{cache_key}-{activations}-int8-revision-{INT8_REVISION}".encode()).hexdigest()[:16]
            cached = cache_root() / "int8" / f"{digest}.onnx"
            if cached.is_file() and compute != "auto":  # "auto" must first see whether the graph is quantised
                return str(cached), compute
        import onnx

        from hatllm_edge.lowbit import int8_compute

        stored = onnx.load(str(path))
        quantised = any(p.key == "hatllm.quant" and p.value != "none" for p in stored.metadata_props)
        compute = resolve_compute(compute, "cpu", quantised)
        if compute == "native":
            return str(path), compute
        data = int8_compute(stored, activations)[0].SerializeToString()
        if cached is not None:
            try:
                _write_atomically(cached, data)
            except OSError:
                pass  # a read-only or full cache costs the next load its time, nothing else
        return data, compute

    @classmethod
    def from_bundle(cls, folder: Path | str, device: Literal["cpu", "cuda"] = "cpu", threads: int | None = None,
                    verify: bool = True, compute: Compute = "auto",
                    optimization: Optimization = "all") -> OnnxBackend:
        """Open ``folder/model.onnx`` after checking the manifest (sizes always, hashes when
        ``verify``). With hashes checked, an int8 route's expanded graph is cached (keyed by
        the graph files' hashes); "auto" is resolved from ``bundle.json``, so a cached graph
        loads without reading the stored one."""
        folder = Path(folder)
        manifest = verify_bundle(folder, hashes=verify)
        # the graph files (model.onnx and any external data) by hash: only hashes checked here make a key
        graph = {n: e["sha256"] for n, e in sorted(manifest["files"].items()) if n.split(".data")[0] == MODEL_FILE}
        key = json.dumps(graph, sort_keys=True) if verify else None
        quant = json.loads((folder / BUNDLE_FILE).read_text(encoding="utf-8")).get("export", {}).get("quant")
        if quant is not None:
            compute = resolve_compute(compute, device, quant != "none")
        return cls(folder / MODEL_FILE, device=device, threads=threads, compute=compute, optimization=optimization,
                   cache_key=key)

    def forward(self, input_ids: np.ndarray, position_ids: np.ndarray, masks: dict[MaskKind, np.ndarray],
                cache: OrtCache | None, last_only: bool = False) -> tuple[np.ndarray, OrtCache]:
        """One step (see :meth:`hatllm_edge.backend.Backend.forward`); masks of kinds the graph
        does not use are ignored. Returns float32 logits [B, Q, V] or [B, V]."""
        targets = np.zeros(np.shape(input_ids), np.int64)
        logits, _, cache = self._run(input_ids, position_ids, masks, cache, 1 if last_only else 0, targets)
        return (logits[:, -1] if last_only else logits), cache

    def token_logprobs(self, input_ids: np.ndarray, position_ids: np.ndarray, masks: dict[MaskKind, np.ndarray],
                       cache: OrtCache | None, targets: np.ndarray) -> tuple[np.ndarray, OrtCache]:
        """log p(targets) [B, Q] float32, computed in the graph (the logits never leave it)."""
        _, logprobs, cache = self._run(input_ids, position_ids, masks, cache, 0, targets, want_logits=False)
        return logprobs, cache

    def _run(self, input_ids: np.ndarray, position_ids: np.ndarray, masks: dict[MaskKind, np.ndarray],
             cache: OrtCache | None, keep: int, targets: np.ndarray,
             want_logits: bool = True) -> tuple[np.ndarray | None, np.ndarray, OrtCache]:
        ids = np.ascontiguousarray(input_ids, np.int64)
        pos = np.ascontiguousarray(position_ids, np.int64)
        batch, q = ids.shape
        past_len = 0 if cache is None else cache.length
        tgt = np.ascontiguousarray(targets, np.int64)
        if pos.shape != ids.shape or tgt.shape != ids.shape:
            raise InputError(f"position_ids {pos.shape} and targets {tgt.shape} must have the shape of input_ids {ids.shape}")
        if cache is not None and cache.batch != batch:
            raise InputError(f"the cache holds {cache.batch} rows, the step has {batch}; select() rows first")
        bind = self.session.io_binding()
        bind.bind_cpu_input("input_ids", ids)
        bind.bind_cpu_input("position_ids", pos)
        bind.bind_cpu_input("target_ids", tgt)
        host = [ids, pos, tgt]  # keeps the bound host arrays alive until the run ends
        for kind in self.mask_kinds:
            if kind not in masks:
                raise InputError(f"mask kind {kind!r} is missing; this model needs {self.mask_kinds}")
            mask = np.ascontiguousarray(masks[kind], bool)
            if mask.shape != (batch, 1, q, past_len + q):
                raise InputError(f"mask_{kind} has shape {mask.shape}, expected {(batch, 1, q, past_len + q)}")
            bind.bind_cpu_input(f"mask_{kind}", mask)
            host.append(mask)
        keep_value = np.array(keep, np.int64)
        bind.bind_cpu_input("logits_to_keep", keep_value)
        host.append(keep_value)
        if cache is None:
            empty = np.zeros((batch, self.num_kv_heads, 0, self.head_dim), self.cache_dtype)
            host.append(empty)
            for name in self._past:
                bind.bind_cpu_input(name, empty)
        else:
            for name, value in zip(self._past, cache.values):
                bind.bind_ortvalue_input(name, value)
        # logits stay on the device when only the target log-probs are read
        bind.bind_output("logits", "cpu" if want_logits else self.device, self.device_id)
        bind.bind_output("target_logprobs", "cpu")
        for name in self._present:
            bind.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(bind)
        outputs = bind.get_outputs()
        logits = outputs[0].numpy() if want_logits else None  # [B, Q', V] float32
        return logits, outputs[1].numpy(), OrtCache(tuple(outputs[2:]), batch, past_len + q)

    def select(self, cache: OrtCache, index: np.ndarray) -> OrtCache:
        """The cache with rows ``index`` [B'] (beam reorder/expand), gathered on the device."""
        idx = np.ascontiguousarray(index, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= cache.batch):
            raise InputError(f"select index out of range for a cache of {cache.batch} rows: {idx.tolist()}")
        bind = self._select.io_binding()
        bind.bind_cpu_input("index", idx)
        for j, value in enumerate(cache.values):
            bind.bind_ortvalue_input(f"in.{j}", value)
            bind.bind_output(f"out.{j}", self.device, self.device_id)
        self._select.run_with_iobinding(bind)
        return OrtCache(tuple(bind.get_outputs()), len(idx), cache.length)

    def cache_arrays(self, cache: OrtCache) -> list[tuple[np.ndarray, np.ndarray]]:
        """The cache copied to host memory, per layer (key, value) [B, kv_heads, P, head_dim]."""
        values = [v.numpy() for v in cache.values]
        return list(zip(values[0::2], values[1::2]))
