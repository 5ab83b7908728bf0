"""The ONNX Runtime backend: runs an exported HatLLM graph behind :class:`hatllm_edge.engine.backend.Backend`.

No torch here, at import or at run time. One code path for CPU and CUDA: every step runs
through an IOBinding, the KV cache stays on the session's device as OrtValues (never copied
to NumPy between steps), only the logits come back to host memory. A step names the cache
rows it continues (``rows``) and the graph gathers them itself, so a beam step or a candidate
pass is one run. Graph contract: :mod:`hatllm_edge.export.graph`. Bundle layout and its manifest: :func:`hatllm_edge.engine.bundle.verify_bundle`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hatllm_edge.core.errors import InputError
from hatllm_edge.core.formats import (
    GRAPH_CONTRACT,
    INPUT_IDS,
    KEY_POSITIONS,
    LOGITS,
    LOGITS_TO_KEEP,
    MASK_INPUT,
    META_DTYPE,
    META_LAYER_KINDS,
    META_MODEL_TYPE,
    META_QUANT,
    MODEL_FILE,
    PAST,
    PAST_ROWS,
    POSITION_IDS,
    PRESENT,
    REQUIRED_INPUTS,
    TARGET_IDS,
    TARGET_LOGPROBS,
)
from hatllm_edge.core.masks import MASK_KINDS, MaskKind
from hatllm_edge.engine.backend import (
    COMPUTES,
    Compute,
    Device,
    Optimization,
    cache_rows,
    key_positions,
    pass_tokens,
    resolve_compute,
)
from hatllm_edge.engine.bundle import (
    check_bundle_meta,
    first_line,
    read_bundle_meta,
    verify_bundle,
)
from hatllm_edge.engine.cuda_graph import GraphRunner, pad_rows, padded
from hatllm_edge.engine.int8_source import int8_source

log = logging.getLogger("hatllm_edge")


def check_device(device: str, compute: str = "auto", cuda_graph: bool = False) -> None:
    """Refuse a device, arithmetic or CUDA-graph choice that this route or this machine cannot
    run. Cheap: callers run it before a bundle is built or a model loaded."""
    import onnxruntime as ort

    if compute not in (*COMPUTES, "int8-tensor"):
        raise InputError(f"compute {compute!r}: expected one of {COMPUTES}")
    if compute.startswith("int8") and device == "cuda":
        raise InputError(f"compute {compute} is a CPU route; use --compute native or auto on CUDA")
    if device not in ("cpu", "cuda"):
        raise InputError(f"device {device!r}: expected 'cpu' or 'cuda'")
    if cuda_graph and device != "cuda":
        raise InputError("CUDA graphs need --device cuda")
    if device == "cuda":
        # ONNX Runtime's default logger warns "No registered plugin EP device found for
        # 'CUDAExecutionProvider'" at every CUDA session start (it looks for plugin EPs
        # before the built-in one): noise to a user. Errors still print.
        ort.set_default_logger_severity(3)
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise InputError("onnxruntime-gpu with a CUDA GPU is needed for --device cuda; available "
                             f"providers: {', '.join(available)}")


PROFILE_ENV = "HATLLM_ORT_PROFILE"  # a file prefix: ONNX Runtime's profiler on (scripts/op_profile.py reads it)


@dataclass(frozen=True)
class OrtCache:
    """The KV cache of one batch: OrtValues [B, kv_heads, P, head_dim] in graph-input order
    (layer 0 key, layer 0 value, layer 1 key, ...), on the session's device, and the cached
    tokens' positions [B, P] on the host (:func:`~hatllm_edge.engine.backend.key_positions`).
    Opaque to callers."""

    values: tuple[Any, ...]
    batch: int
    length: int
    positions: np.ndarray


class OnnxBackend:
    """One exported HatLLM graph in an ONNX Runtime session.

    device "cpu" (CPUExecutionProvider) or "cuda" (CUDAExecutionProvider, never a silent CPU
    fallback); ``threads`` fixes the intra-op thread count (None: ONNX Runtime's default).
    ``compute``: "native" runs the graph as stored; "int8" first expands every weight matmul
    to signed int8 with activations quantised per token (:func:`hatllm_edge.engine.int8.int8_compute`,
    CPU only); "int8-tensor" the same with one activation scale per tensor
    (``DynamicQuantizeMatMul``: fewer ops, much less faithful); "int8-block" keeps the stored
    4/8-bit weights and runs them on ONNX Runtime's int8 kernels, activations quantised per block
    of K (:func:`hatllm_edge.engine.int8.block_compute`, CPU only); "auto" as
    :func:`~hatllm_edge.engine.backend.resolve_compute` says.
    ``optimization``: ONNX Runtime's graph optimisation level ("all", "basic" or "none").
    ``cuda_graph``: replay each pass shape as a captured CUDA graph (:mod:`hatllm_edge.engine.cuda_graph`).
    Exposes ``load_seconds``, ``metadata`` (the graph's metadata_props), ``layer_kinds`` and
    ``compute`` (what was chosen).
    """

    def __init__(self, onnx_path: Path | str, device: Device = "cpu",
                 threads: int | None = None, device_id: int = 0, compute: Compute = "auto",
                 optimization: Optimization = "all", cache_key: str | None = None, cuda_graph: bool = False) -> None:
        import onnxruntime as ort

        path = Path(onnx_path)
        if not path.is_file():
            raise InputError(f"ONNX model {path}: no such file")
        if threads is not None and threads < 1:
            raise InputError(f"threads must be >= 1, got {threads}")
        check_device(device, compute, cuda_graph)
        if device == "cuda":
            cuda = {"device_id": device_id} | ({"enable_cuda_graph": "1"} if cuda_graph else {})
            providers: list[Any] = [("CUDAExecutionProvider", cuda)]
        else:
            providers = ["CPUExecutionProvider"]
        self.device, self.device_id = device, device_id

        levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
        if optimization not in levels:
            raise InputError(f"optimization {optimization!r}: expected one of {tuple(levels)}")
        options = ort.SessionOptions()
        options.graph_optimization_level = levels[optimization]
        options.log_severity_level = 3
        if profile := os.environ.get(PROFILE_ENV):  # per-node timings of every run, written when the session ends
            options.enable_profiling, options.profile_file_prefix = True, profile
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        start = time.perf_counter()
        source: str | bytes = str(path)
        if compute == "auto" and device == "cuda":
            compute = "native"
        cached = None
        if compute != "native":
            source, compute, cached = int8_source(path, compute, cache_key)
        self.compute: Compute = compute
        try:
            self.session = ort.InferenceSession(source, options, providers=providers)
        except Exception as e:  # ONNX Runtime's own exception types (InvalidProtobuf, Fail, ...) derive from Exception
            if cached is None:
                raise InputError(f"ONNX model {path} does not load in ONNX Runtime ({type(e).__name__}: {first_line(e)}); "
                                 "re-export the bundle") from None
            # a cached expansion that matched its hash but does not load: build it again, once
            log.warning("cached int8 graph %s does not load (%s); rebuilding it from the verified bundle",
                        cached[0].path(cached[1]), type(e).__name__)
            cached[0].drop(cached[1])
            source, compute, _ = int8_source(path, compute, cache_key)
            self.session = ort.InferenceSession(source, options, providers=providers)
        self.load_seconds = time.perf_counter() - start
        if device == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            # ORT falls back to CPU when the CUDA libraries fail to load; refuse that here
            raise InputError("onnxruntime could not start CUDAExecutionProvider (CUDA/cuDNN libraries "
                             f"missing?); session providers: {', '.join(self.session.get_providers())}")

        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        if META_LAYER_KINDS not in self.metadata:
            raise InputError(f"ONNX model {path} carries no hatllm.layer_kinds metadata; export it with hatllm-edge")
        try:
            self.layer_kinds: list[MaskKind] = json.loads(self.metadata[META_LAYER_KINDS])
            if not isinstance(self.layer_kinds, list) or not set(self.layer_kinds) <= set(MASK_KINDS):
                raise ValueError(self.metadata[META_LAYER_KINDS][:80])
        except ValueError as e:
            raise InputError(f"ONNX model {path}: its hatllm.layer_kinds metadata is not a list of {MASK_KINDS} ({e}); "
                             "re-export it") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        missing = [name for name in REQUIRED_INPUTS if name not in inputs]
        if missing:
            raise InputError(f"ONNX model {path} lacks the input(s) {missing} of graph contract {GRAPH_CONTRACT}: it was "
                             "exported by an older hatllm-edge; export it again (hatllm-edge export)")
        self.mask_kinds: list[MaskKind] = [k for k in MASK_KINDS if MASK_INPUT.format(k) in inputs]
        self._sliding = KEY_POSITIONS in inputs
        if not self._sliding and self.metadata.get(META_MODEL_TYPE) == "gemma3_text":
            raise InputError(f"ONNX model {path} counts its sliding window on cache slots (an older hatllm-edge's export), "
                             "which misranks long prompts; export it again (hatllm-edge export)")
        n = len(self.layer_kinds)
        self._past = [PAST.format(i, p) for i in range(n) for p in ("key", "value")]
        self._present = [PRESENT.format(i, p) for i in range(n) for p in ("key", "value")]
        past = inputs[self._past[0]]
        self.num_kv_heads, self.head_dim = int(past.shape[1]), int(past.shape[3])
        self.cache_dtype = np.float16 if past.type == "tensor(float16)" else np.float32
        self.runs = 0  # session runs so far: what bench reports per request
        # tokens (rows x width) one candidate pass may hold: bounded by host memory and cache
        # locality on the CPU, by launch overhead on a GPU (fewer, wider passes)
        self.vocab_size = int(self.session.get_outputs()[0].shape[2])
        self.pass_tokens = pass_tokens(device, self.vocab_size)
        self._empty_past = np.zeros((1, self.num_kv_heads, 0, self.head_dim), self.cache_dtype)  # a first step's cache
        self._graphs: GraphRunner | None = None
        self._plain = None  # run options of a plain pass on a session that captures graphs
        if cuda_graph:
            self._graphs = GraphRunner(self.session, device, device_id)
            self._plain = ort.RunOptions()
            self._plain.add_run_config_entry("gpu_graph_id", "-1")

    @classmethod
    def from_bundle(cls, folder: Path | str, device: Device = "cpu", threads: int | None = None,
                    verify: bool = True, compute: Compute = "auto",
                    optimization: Optimization = "all", cuda_graph: bool = False) -> OnnxBackend:
        """Open ``folder/model.onnx`` after checking the manifest (sizes always, hashes when
        ``verify``). With hashes checked, an int8 route's expanded graph is cached (keyed by
        the graph files' hashes); "auto" is resolved from ``bundle.json``, so a cached graph
        loads without reading the stored one."""
        folder = Path(folder)
        manifest = verify_bundle(folder, hashes=verify)
        # the graph files (model.onnx and any external data) by hash: only hashes checked here make a key
        graph = {n: e["sha256"] for n, e in sorted(manifest["files"].items()) if n.split(".data")[0] == MODEL_FILE}
        key = json.dumps(graph, sort_keys=True) if verify else None
        meta = read_bundle_meta(folder)
        quant = (meta.export or {}).get("quant")
        if quant is not None:
            compute = resolve_compute(compute, device, quant, meta.model_type)
        backend = cls(folder / MODEL_FILE, device=device, threads=threads, compute=compute, optimization=optimization,
                      cache_key=key, cuda_graph=cuda_graph)
        check_bundle_meta(folder, meta, manifest, backend.metadata)  # the graph's own word wins over bundle.json
        return backend

    @property
    def label(self) -> str:
        """``onnx-<quant>-<dtype>-<device>-<compute>``, from what the graph records about itself."""
        return f"onnx-{self.metadata.get(META_QUANT, '?')}-{self.metadata.get(META_DTYPE, '?')}-{self.device}-{self.compute}"

    @property
    def exact_layout(self) -> bool:
        """Whether a result can move with the padding around it (the int8 routes' per-token
        quantiser, :func:`hatllm_edge.ranking.prefill.prompt_width`): batches then join only prompts of
        one width. Native arithmetic moves by rounding only, so any batch runs as one."""
        return self.compute.startswith("int8")

    def forward(self, input_ids: np.ndarray, position_ids: np.ndarray, masks: dict[MaskKind, np.ndarray],
                cache: OrtCache | None, last_only: bool = False, rows: np.ndarray | None = None) -> tuple[np.ndarray, OrtCache]:
        """One step (see :meth:`hatllm_edge.engine.backend.Backend.forward`); masks of kinds the graph
        does not use are ignored. Returns float32 logits [B, Q, V] or [B, V]."""
        targets = np.zeros((*np.shape(input_ids), 1), np.int64)
        logits, _, cache = self._run(input_ids, position_ids, masks, cache, 1 if last_only else 0, targets, rows)
        return (logits[:, -1] if last_only else logits), cache

    def token_logprobs(self, input_ids: np.ndarray, position_ids: np.ndarray, masks: dict[MaskKind, np.ndarray],
                       cache: OrtCache | None, targets: np.ndarray,
                       rows: np.ndarray | None = None) -> tuple[np.ndarray, OrtCache]:
        """log p(targets), [B, Q] or [B, Q, C] like ``targets``, float32, computed in the graph
        (the logits never leave it)."""
        tgt = np.asarray(targets, np.int64)
        _, logprobs, cache = self._run(input_ids, position_ids, masks, cache, 0, tgt if tgt.ndim == 3 else tgt[..., None],
                                       rows, want_logits=False)
        return (logprobs if tgt.ndim == 3 else logprobs[..., 0]), cache

    def _run(self, input_ids: np.ndarray, position_ids: np.ndarray, masks: dict[MaskKind, np.ndarray],
             cache: OrtCache | None, keep: int, targets: np.ndarray, rows: np.ndarray | None = None,
             want_logits: bool = True) -> tuple[np.ndarray | None, np.ndarray, OrtCache]:
        ids = np.ascontiguousarray(input_ids, np.int64)
        pos = np.ascontiguousarray(position_ids, np.int64)
        batch, q = ids.shape
        past_len = 0 if cache is None else cache.length
        tgt = np.ascontiguousarray(targets, np.int64)
        if pos.shape != ids.shape or tgt.shape[:2] != ids.shape or tgt.ndim != 3:
            raise InputError(f"position_ids {pos.shape} and targets {tgt.shape} must have the shape of input_ids {ids.shape} "
                             "(targets with a last axis of target tokens)")
        if rows is None and cache is not None and self._graphs is not None:
            rows = np.arange(batch)  # a graph's cache may hold padding rows after the real ones
        past_rows = cache_rows(rows, batch, None if cache is None else cache.batch)
        row_inputs = {}  # the masks, and key_positions where the graph slides: one row per step row
        for kind in self.mask_kinds:
            if kind not in masks:
                raise InputError(f"mask kind {kind!r} is missing; this model needs {self.mask_kinds}")
            mask = np.ascontiguousarray(masks[kind], bool)
            if mask.shape != (batch, 1, q, past_len + q):
                raise InputError(f"{MASK_INPUT.format(kind)} has shape {mask.shape}, expected {(batch, 1, q, past_len + q)}")
            row_inputs[MASK_INPUT.format(kind)] = mask
        keys = key_positions(None if cache is None else cache.positions, past_rows, pos)
        if self._sliding:
            row_inputs[KEY_POSITIONS] = keys
        if self._graphs is not None:
            done = self._run_graph(ids, pos, row_inputs, cache, keep, tgt, past_rows, want_logits, keys)
            if done is not None:
                return done
        bind = self.session.io_binding()
        bind.bind_cpu_input(INPUT_IDS, ids)
        bind.bind_cpu_input(POSITION_IDS, pos)
        bind.bind_cpu_input(TARGET_IDS, tgt)
        bind.bind_cpu_input(PAST_ROWS, past_rows)
        host = [ids, pos, tgt, past_rows]  # keeps the bound host arrays alive until the run ends
        for name, mask in row_inputs.items():
            bind.bind_cpu_input(name, mask)
            host.append(mask)
        keep_value = np.array(keep, np.int64)
        bind.bind_cpu_input(LOGITS_TO_KEEP, keep_value)
        host.append(keep_value)
        if cache is None:
            for name in self._past:
                bind.bind_cpu_input(name, self._empty_past)
        else:
            for name, value in zip(self._past, cache.values):
                bind.bind_ortvalue_input(name, value)
        # logits stay on the device when only the target log-probs are read
        bind.bind_output(LOGITS, "cpu" if want_logits else self.device, self.device_id)
        bind.bind_output(TARGET_LOGPROBS, "cpu")
        for name in self._present:
            bind.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(bind, self._plain)
        self.runs += 1
        outputs = bind.get_outputs()
        logits = outputs[0].numpy() if want_logits else None  # [B, Q', V] float32
        return logits, outputs[1].numpy(), OrtCache(tuple(outputs[2:]), batch, past_len + q, keys)

    def _run_graph(self, ids: np.ndarray, pos: np.ndarray, masks: dict[str, np.ndarray], cache: OrtCache | None,
                   keep: int, targets: np.ndarray, past_rows: np.ndarray,
                   want_logits: bool, keys: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, OrtCache] | None:
        """:meth:`_run` as a captured graph: rows and targets padded to powers of two, the
        padding dropped from what comes back (the cache keeps it: later steps name their rows).
        None when the graph runner declines a new shape (then the pass runs plainly)."""
        assert self._graphs is not None
        (batch, q), choices = ids.shape, targets.shape[2]
        rows, width = padded(batch), padded(choices)
        tgt = np.concatenate([targets, np.zeros((batch, q, width - choices), np.int64)], axis=2)
        feeds = {INPUT_IDS: pad_rows(ids, rows), POSITION_IDS: pad_rows(pos, rows), TARGET_IDS: pad_rows(tgt, rows),
                 PAST_ROWS: pad_rows(past_rows, rows), LOGITS_TO_KEEP: np.array(keep, np.int64)}
        feeds |= {name: pad_rows(mask, rows) for name, mask in masks.items()}
        past = list(zip(self._past, cache.values)) if cache is not None else [(name, self._empty_past) for name in self._past]
        total, kept = (0 if cache is None else cache.length) + q, keep or q
        outputs = [(LOGITS, (rows, kept, self.vocab_size), np.float32), (TARGET_LOGPROBS, (rows, kept, width), np.float32)]
        outputs += [(name, (rows, self.num_kv_heads, total, self.head_dim), self.cache_dtype) for name in self._present]
        values = self._graphs.run(feeds, past, outputs)
        if values is None:
            return None
        self.runs += 1
        logits = values[0].numpy()[:batch] if want_logits else None
        return logits, values[1].numpy()[:batch, :, :choices], OrtCache(tuple(values[2:]), rows, total, pad_rows(keys, rows))

    def cache_arrays(self, cache: OrtCache) -> list[tuple[np.ndarray, np.ndarray]]:
        """The cache copied to host memory, per layer (key, value) [B, kv_heads, P, head_dim]."""
        values = [v.numpy() for v in cache.values]
        return list(zip(values[0::2], values[1::2]))
