"""What a backend name stands for (``torch-fp32|bf16|nf4``, ``ort-<quant>[-native|-int8|-block]``), how it
is opened, and one request of a workload on it through the shared ranking code."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from hatllm_edge.app.models import BundleBuilder, cached_bundle, open_model
from hatllm_edge.bench.workloads import Workload
from hatllm_edge.core.errors import InputError
from hatllm_edge.core.formats import MODEL_FILE
from hatllm_edge.core.prompt import PromptBuilder
from hatllm_edge.ranking.candidates import score_candidates
from hatllm_edge.ranking.ranker import Ranker
from hatllm_edge.ranking.search import beam_search

TORCH_BACKENDS = ("torch-fp32", "torch-bf16", "torch-nf4")
ORT_QUANTS = {"fp32": "none", "fp16": "none", "nf4": "nf4", "int4": "int4", "int8": "int8"}
DEFAULT_BACKENDS = ("torch-fp32", "torch-bf16", "torch-nf4", "ort-fp32", "ort-nf4", "ort-int4", "ort-int4-native", "ort-int8")
CUDA_BACKENDS = ("ort-fp32", "ort-fp16", "ort-int4", "ort-nf4")


class TokenCounter:
    """Wraps a backend to count the tokens fed to it (padding included: it is computed)."""

    def __init__(self, backend: Any) -> None:
        self.backend, self.tokens = backend, 0

    def __getattr__(self, name: str) -> Any:  # runs, exact_layout, pass_tokens: the backend's own
        return getattr(self.backend, name)

    def forward(self, input_ids: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        self.tokens += int(input_ids.size)
        return self.backend.forward(input_ids, *args, **kwargs)

    def token_logprobs(self, input_ids: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        self.tokens += int(input_ids.size)
        return self.backend.token_logprobs(input_ids, *args, **kwargs)


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith(MODEL_FILE)) / 1e6


def open_backend(name: str, checkpoint: Path, device: str, threads: int, progress: bool,
                 build: BundleBuilder | None = None, cuda_graph: bool = False) -> tuple[Ranker, float]:
    """The ranker a backend name stands for, and its size on disk (or in memory for torch) in MB.
    ``ort-<fp32|fp16|nf4|int4|int8>[-native|-int8|-block]``: a bundle exported from ``checkpoint``
    into the bundle cache on first use; the suffix picks the engine's compute route."""
    if name in TORCH_BACKENDS:
        ranker = open_model(checkpoint, threads=threads, bf16=name == "torch-bf16", nf4=name == "torch-nf4")
        model = ranker.backend.model  # type: ignore[attr-defined]
        size = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        return ranker, size / 1e6
    quant, dtype, compute = ort_backend(name)
    folder = cached_bundle(checkpoint, quant, dtype, progress, build)
    ranker = open_model(folder, device, threads, compute=compute, cuda_graph=cuda_graph)  # type: ignore[arg-type]
    return ranker, folder_mb(folder)



def ort_backend(name: str) -> tuple[str, str, str]:
    """``ort-<fp32|fp16|nf4|int4|int8>[-native|-int8|-block]`` as (quant, dtype, compute; block:
    int8-block); any other name that is not a torch backend is refused, so a typo stops bench
    before the first backend runs."""
    parts = name.split("-")
    routes = {"native": "native", "int8": "int8", "block": "int8-block"}
    if parts[0] != "ort" or len(parts) not in (2, 3) or parts[1] not in ORT_QUANTS or (len(parts) == 3 and parts[2] not in routes):
        raise InputError(f"backend {name!r}: expected one of {TORCH_BACKENDS} or ort-<fp32|fp16|nf4|int4|int8>[-native|-int8|-block]")
    return ORT_QUANTS[parts[1]], "fp16" if parts[1] == "fp16" else "fp32", routes[parts[2]] if len(parts) == 3 else "auto"


def all_history(ranker: Ranker) -> PromptBuilder:
    """The ranker's prompt builder with the model's ``max_history`` lifted: 20 items are 20."""
    return ranker.prompts.with_max_history(0)


def runner(ranker: Ranker, w: Workload) -> Callable[[list[list[int]], list[list[int]]], None]:
    """One request of ``w`` on ``ranker``: the shared ranking code, every history item kept."""
    prompts = all_history(ranker)
    if w.kind == "candidates":
        return lambda h, c: score_candidates(ranker.backend, prompts, [ranker.titles(x) for x in h], [ranker.titles(x) for x in c])  # type: ignore[return-value]
    return lambda h, _: beam_search(ranker.backend, prompts, ranker.trie, [ranker.titles(x) for x in h], k=w.k)  # type: ignore[return-value]


