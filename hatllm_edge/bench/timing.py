"""Timing: every backend on every workload, one after another (each its own load time and peak
memory), then the verdict's contenders again taking turns request by request."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from tqdm import tqdm

from hatllm_edge.app.models import BundleBuilder, model_kind
from hatllm_edge.bench import verdict
from hatllm_edge.bench.backends import (
    DEFAULT_BACKENDS,
    TokenCounter,
    open_backend,
    runner,
)
from hatllm_edge.bench.records import BackendRun, Result
from hatllm_edge.bench.workloads import Workload, default_workloads, make_requests
from hatllm_edge.core.data import Dataset
from hatllm_edge.core.errors import InputError
from hatllm_edge.core.machine import (
    cpu_flags,
    cpu_name,
    onnxruntime_sets_up_amx,
    peak_rss_mib,
    reset_peak_rss,
    versions,
)


def _gpu_mem_mb() -> float | None:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return float(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class BenchConfig:
    checkpoint: Path
    backends: tuple[str, ...] = DEFAULT_BACKENDS
    workloads: tuple[Workload, ...] = tuple(default_workloads())
    device: Literal["cpu", "cuda"] = "cpu"
    threads: int = 2
    min_repeats: int = 3
    max_repeats: int = 30
    seconds: float = 6.0  # per backend and workload, after warm-up
    seed: int = 0
    paired: int = 10  # rounds of the paired target check (0: off)
    build: BundleBuilder | None = None  # exports the bundles (see ranker.cached_bundle)
    cuda_graph: bool = False  # ORT backends on CUDA replay captured graphs


def run_bench(cfg: BenchConfig, data: Dataset, progress: bool = True) -> dict[str, Any]:
    """Run every backend on every workload; returns the JSON-able report."""
    if model_kind(cfg.checkpoint) != "checkpoint":
        raise InputError(f"{cfg.checkpoint}: bench needs a checkpoint folder (it builds every bundle from it)")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, str(cfg.threads))
    requests = {w.name: make_requests(data, w, cfg.seed, cfg.max_repeats + 1) for w in cfg.workloads}
    runs: list[BackendRun] = []
    bar = tqdm(total=len(cfg.backends) * len(cfg.workloads), desc="bench", unit="run", disable=not progress)
    for name in cfg.backends:
        reset_peak_rss()
        gpu_before = _gpu_mem_mb() if cfg.device == "cuda" else None
        start = time.perf_counter()
        ranker, size = open_backend(name, cfg.checkpoint, cfg.device, cfg.threads, progress, cfg.build,
                                    cfg.cuda_graph and name.startswith("ort-"))
        load_s = time.perf_counter() - start
        if data.catalog.item_ids != ranker.catalog.item_ids:
            raise InputError(f"{cfg.checkpoint}: its catalog differs from the benchmark data set")
        counter = TokenCounter(ranker.backend)
        ranker.backend = counter  # type: ignore[assignment]
        ranker.trie  # built outside the timings (as a server would at start-up)
        run = BackendRun(name, round(load_s, 3), round(size, 1), 0.0, None)
        for w in cfg.workloads:
            bar.set_postfix_str(f"{name} {w.name}")
            go, reqs = runner(ranker, w), requests[w.name]
            go(*reqs[-1])  # warm-up
            counter.tokens, runs_before = 0, counter.runs
            latencies: list[float] = []
            began = time.perf_counter()
            while len(latencies) < cfg.max_repeats and (len(latencies) < cfg.min_repeats or time.perf_counter() - began < cfg.seconds):
                t = time.perf_counter()
                go(*reqs[len(latencies)])
                latencies.append((time.perf_counter() - t) * 1000)
            passes = (counter.runs - runs_before) / len(latencies)
            run.results.append(Result(name, w.name, [round(x, 3) for x in latencies], counter.tokens // len(latencies),
                                      round(passes, 2)).finish(w.batch))
            bar.update()
        run.peak_rss_mb = round(peak_rss_mib(), 1)
        if gpu_before is not None:
            after = _gpu_mem_mb()
            run.gpu_mem_mb = None if after is None else after - gpu_before
        runs.append(run)
        del ranker, counter
    bar.close()
    paired = run_paired(cfg, requests, runs, progress) if cfg.paired else []
    return {
        "config": {"checkpoint": str(cfg.checkpoint), "device": cfg.device, "threads": cfg.threads, "cuda_graph": cfg.cuda_graph,
                   "min_repeats": cfg.min_repeats, "max_repeats": cfg.max_repeats, "seconds": cfg.seconds, "seed": cfg.seed,
                   "paired_rounds": cfg.paired, "workloads": [asdict(w) | {"name": w.name} for w in cfg.workloads]},
        "machine": {"platform": platform.platform(), "cpu": cpu_name(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "versions": versions(),
                    # AMX decides which backend leads; whether ONNX Runtime's int8 GEMM runs on it
                    "amx": "amx_int8" in cpu_flags(), "onnxruntime_amx": onnxruntime_sets_up_amx()},
        "backends": [asdict(r) for r in runs],
        "paired": [asdict(r) for r in paired],
        # the verdict from the paired check when it ran (drift cancels there), else from the table
        "targets": verdict.targets(paired) if paired else verdict.targets(runs),
        "targets_sequential": verdict.targets(runs),
    }


def run_paired(cfg: BenchConfig, requests: dict[str, list[Any]], runs: Sequence[BackendRun],
               progress: bool = True) -> list[BackendRun]:
    """The target comparisons again, with the contenders loaded side by side and taking turns
    request by request (the order rotating each round), ``cfg.paired`` rounds per workload.

    Why: on a shared machine the speed drifts by 10-20% over minutes, so two backends timed
    minutes apart can differ by that much for no reason of their own; taking turns puts both
    under the same drift."""
    plan = verdict.contenders(runs)
    names = list(dict.fromkeys(n for group in plan.values() for n in group))
    rankers = {n: open_backend(n, cfg.checkpoint, cfg.device, cfg.threads, progress, cfg.build,
                               cfg.cuda_graph and n.startswith("ort-"))[0] for n in names}
    out = {n: BackendRun(n, 0.0, 0.0, 0.0, None) for n in names}
    workloads = {w.name: w for w in cfg.workloads}
    rounds = min(cfg.paired, cfg.max_repeats)
    bar = tqdm(total=rounds * sum(len(g) for g in plan.values()), desc="paired", unit="req", disable=not progress)
    for wname, group in plan.items():
        w, reqs = workloads[wname], requests[wname]
        go = {n: runner(rankers[n], w) for n in group}
        for _ in range(2):  # warm-up: in one run torch fp32's first turns after one warm-up took 1.6x its later ones
            for n in group:
                go[n](*reqs[-1])
        latencies: dict[str, list[float]] = {n: [] for n in group}
        for i in range(rounds):
            for n in group[i % len(group):] + group[: i % len(group)]:
                t = time.perf_counter()
                go[n](*reqs[i])
                latencies[n].append(round((time.perf_counter() - t) * 1000, 3))
                bar.update()
        for n in group:
            out[n].results.append(Result(n, wname, latencies[n], 0).finish(w.batch))
    bar.close()
    return list(out.values())


