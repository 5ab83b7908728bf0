"""Opening a model for ranking: an exported bundle (the engine), a training checkpoint
(PyTorch), or a checkpoint's bundle built on first use into the cache (the exporter); and the
fine-tuned model shipped with the package.

This module sits above the training stack and the exporter and imports them only when a
checkpoint is opened or exported, so that ranking from a bundle never loads torch.
"""

from __future__ import annotations

import hashlib
import importlib.util
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable, Literal

from hatllm_edge.core import formats
from hatllm_edge.core.errors import InputError
from hatllm_edge.core.formats import BUNDLE_META, CHECKPOINT_META
from hatllm_edge.engine.backend import Compute
from hatllm_edge.engine.cache import (
    cache_root,
    clean_stale,
    file_lock,
    require_writable,
)
from hatllm_edge.ranking.ranker import Device, Ranker

DEFAULT_MODEL = "hatllm-gemma3-ml100k"


def default_checkpoint() -> Path:
    """The shipped fine-tuned model (package data of :mod:`hatllm_edge.models`; in a checkout,
    the repository's ``models/``)."""
    return Path(str(files("hatllm_edge.models") / DEFAULT_MODEL))


def bundle_builder() -> BundleBuilder | None:
    """The exporter, for commands that build a checkpoint's bundle on first use; None on an
    engine-only install (no torch), where they then ask for a bundle instead. Imported only
    when a bundle is built: torch and transformers take seconds to import, and a ranking from
    a built bundle needs neither."""
    try:
        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
            return None
    except ImportError:  # an import hook that blocks them says the same
        return None

    def build(checkpoint: Path, out: Path, quant: str, dtype: str, progress: bool) -> Path:
        from hatllm_edge.export.checkpoint import export_checkpoint

        return export_checkpoint(checkpoint, out, quant, dtype, progress=progress, overwrite=True)  # type: ignore[arg-type]

    return build


def bundle_cache_dir(checkpoint: Path, quant: str) -> Path:
    """Where the bundle built from ``checkpoint`` on first use lives: keyed by the checkpoint's
    content, the engine's graph contract and the exporter's graph revision, so neither a
    retrained checkpoint nor a newer engine or exporter ever reuses a stale bundle."""
    digest = hashlib.sha256(f"graph-contract-{formats.GRAPH_CONTRACT}-revision-{formats.GRAPH_REVISION}".encode())
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors", ".jsonl", ".onnx")):
        digest.update(path.relative_to(checkpoint).as_posix().encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return cache_root() / f"{checkpoint.name}-{digest.hexdigest()[:12]}" / f"onnx-{quant}"


BundleBuilder = Callable[[Path, Path, str, str, bool], Any]
"""Exports checkpoint -> new bundle folder (quant, dtype, progress): :func:`bundle_builder`'s
exporter, passed in by the caller, so that ranking from a built bundle never imports it."""


def cached_bundle(checkpoint: Path, quant: str, dtype: str = "fp32", progress: bool = True,
                  build: BundleBuilder | None = None) -> Path:
    """The bundle of ``checkpoint`` in the cache, exported there by ``build`` (with a progress
    bar) the first time it is asked for. One process builds it, under a file lock beside it;
    others asking at the same time wait and reuse it. The cache must be writable to build
    (checked before anything is loaded); a built bundle is only read."""
    folder = bundle_cache_dir(checkpoint, quant if dtype == "fp32" else f"{quant}-{dtype}")
    if (folder / BUNDLE_META).is_file():  # published by a rename: bundle.json there = complete
        return folder
    if build is None:
        raise InputError(f"{checkpoint} is a training checkpoint and this install cannot export it (the exporter needs the "
                         f"training stack, the train extra: pip install '.[train]' in the checkout); or pass an exported bundle with --model")
    require_writable(folder.parent)
    with file_lock(folder.parent / f".{folder.name}.lock", str(folder)):
        if (folder / BUNDLE_META).is_file():  # built by another process while we waited
            return folder
        clean_stale(folder)
        build(checkpoint, folder, quant, dtype, progress)
    return folder


def model_kind(folder: Path) -> Literal["bundle", "checkpoint"]:
    if (folder / BUNDLE_META).is_file():
        return "bundle"
    if (folder / CHECKPOINT_META).is_file():
        return "checkpoint"
    raise InputError(f"{folder}: neither an ONNX bundle (no {BUNDLE_META}) nor a checkpoint (no {CHECKPOINT_META})")


def open_model(folder: Path, device: Device = "cpu", threads: int | None = None, bf16: bool = False,
               compute: Compute = "auto", nf4: bool = False, cuda_graph: bool = False) -> Ranker:
    """A ranker for a bundle (the engine; ``compute`` as in :class:`~hatllm_edge.engine.session.OnnxBackend`)
    or a checkpoint (PyTorch on the CPU, ``threads`` its intra-op threads; ``bf16`` weights or
    ``nf4`` bitsandbytes Linears). An option that does not apply to the folder is refused."""
    if model_kind(folder) == "bundle":
        if bf16 or nf4:
            raise InputError(f"{folder} is an ONNX bundle: its weights were fixed at export; --bf16 and --nf4 "
                             "apply to a PyTorch checkpoint (export with --quant nf4 for an NF4 bundle)")
        return Ranker.from_bundle(folder, device, threads, compute, cuda_graph=cuda_graph)
    if cuda_graph or device != "cpu" or compute not in ("auto", "native"):  # PyTorch runs the weights as stored: native
        raise InputError(f"{folder} is a checkpoint, run in PyTorch on the CPU: --device cuda, --compute int8 and --cuda-graph "
                         f"choose the engine's device and arithmetic (export it with 'hatllm-edge export' and pass the bundle)")
    try:
        import torch
    except ImportError:
        raise InputError(f"{folder} is a training checkpoint, run in PyTorch, which this install lacks: pip install "
                         f"'.[train]' in the checkout (the train extra), or export it elsewhere and pass the bundle") from None

    from hatllm_edge.training.torch_backend import checkpoint_ranker

    if threads:
        torch.set_num_threads(threads)

    return checkpoint_ranker(folder, bf16=bf16, nf4=nf4)
