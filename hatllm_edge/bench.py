"""``hatllm-edge bench``: every backend on the same seeded workloads, in one process and run.

Each backend is opened (load time measured), warmed up on every workload, then timed
request by request: at least ``min_repeats`` times and until ``seconds`` per workload have
passed (at most ``max_repeats``). A request is one call of the shared ranking code
(:func:`~hatllm_edge.ranking.score_candidates` or :func:`~hatllm_edge.ranking.beam_search`)
for a batch of users, so every backend runs the very same algorithm. Peak RSS is reset
before each backend loads (``/proc/self/clear_refs``), so each figure is that backend's own.
The targets are then timed again in a paired check (:func:`run_paired`): the machine's
speed drifts, and backends that take turns request by request drift together.

Histories are real: the last ``history`` items before each test target of MovieLens-100K;
candidates are the target plus seeded random catalog items. The prompt keeps every history
item given (the model's own ``max_history`` is lifted), so 20 items are 20 items.
"""

from __future__ import annotations

import json
import os
import platform
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
from tqdm import tqdm

from hatllm_edge.data import Dataset
from hatllm_edge.errors import InputError
from hatllm_edge.prompt import PromptBuilder
from hatllm_edge.ranker import BundleBuilder, Ranker, cached_bundle, model_kind
from hatllm_edge.ranking import PACK_TOKENS, PASS_TOKENS, PROMPT_BUCKET, beam_search, log_softmax, score_candidates

TORCH_BACKENDS = ("torch-fp32", "torch-bf16", "torch-nf4")
ORT_QUANTS = {"fp32": "none", "fp16": "none", "nf4": "nf4", "int4": "int4", "int8": "int8"}
DEFAULT_BACKENDS = ("torch-fp32", "torch-bf16", "torch-nf4", "ort-fp32", "ort-nf4", "ort-int4", "ort-int4-native", "ort-int8")
CUDA_BACKENDS = ("ort-fp32", "ort-fp16", "ort-int4", "ort-nf4")
CAND_TARGET, TOPK_TARGET = "cand100-h20-b1", "top10-h10-b1"  # the workloads the issue sets targets on


@dataclass(frozen=True)
class Workload:
    """One request shape: ``candidates`` > 0 scores that many titles per user, 0 is the
    full-catalog top-``k`` beam search; ``batch`` users per request."""

    kind: Literal["candidates", "topk"]
    history: int
    batch: int
    candidates: int = 0
    k: int = 10

    @property
    def name(self) -> str:
        what = f"cand{self.candidates}" if self.kind == "candidates" else f"top{self.k}"
        return f"{what}-h{self.history}-b{self.batch}"

    @classmethod
    def parse(cls, name: str) -> "Workload":
        """``cand<C>-h<H>-b<B>`` or ``top<K>-h<H>-b<B>``, e.g. ``cand100-h20-b1``."""
        match = re.fullmatch(r"(cand|top)(\d+)-h(\d+)-b(\d+)", name.strip())
        if not match or min(int(g) for g in match.groups()[1:]) < 1:
            raise InputError(f"workload {name!r}: expected cand<C>-h<H>-b<B> or top<K>-h<H>-b<B> with positive numbers, "
                             "e.g. cand100-h20-b1 or top10-h10-b8")
        what, n, h, b = match.group(1), *(int(g) for g in match.groups()[1:])
        if what == "cand":
            return cls("candidates", h, b, candidates=n)
        return cls("topk", h, b, k=n)


def default_workloads() -> list[Workload]:
    """Candidate ranking (history 5/10/20 x 20/100 candidates) and full-catalog top-10
    (history 10), each at batch 1 and 8."""
    out = [Workload("candidates", h, b, c) for b in (1, 8) for h in (5, 10, 20) for c in (20, 100)]
    return out + [Workload("topk", 10, b) for b in (1, 8)]


@dataclass
class Result:
    backend: str
    workload: str
    latencies_ms: list[float]
    tokens: int  # tokens fed to the model per request
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    requests_per_s: float = 0.0
    users_per_s: float = 0.0
    tokens_per_s: float = 0.0

    def finish(self, batch: int) -> "Result":
        lat = np.asarray(self.latencies_ms)
        self.p50_ms, self.p95_ms, self.p99_ms = (float(np.percentile(lat, q)) for q in (50, 95, 99))
        self.requests_per_s = 1000.0 / float(lat.mean())
        self.users_per_s = self.requests_per_s * batch
        self.tokens_per_s = self.tokens * self.requests_per_s
        return self


@dataclass
class BackendRun:
    name: str
    load_s: float
    size_mb: float
    peak_rss_mb: float
    gpu_mem_mb: float | None
    results: list[Result] = field(default_factory=list)


class _TokenCounter:
    """Wraps a backend to count the tokens fed to it (padding included: it is computed)."""

    def __init__(self, backend: Any) -> None:
        self.backend, self.tokens = backend, 0

    def forward(self, input_ids: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        self.tokens += int(input_ids.size)
        return self.backend.forward(input_ids, *args, **kwargs)

    def token_logprobs(self, input_ids: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        self.tokens += int(input_ids.size)
        return self.backend.token_logprobs(input_ids, *args, **kwargs)

    def select(self, cache: Any, index: np.ndarray) -> Any:
        return self.backend.select(cache, index)


def _rss_mb(field_name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: peak RSS is then the process's peak so far


def _gpu_mem_mb() -> float | None:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return float(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx")) / 1e6


def open_backend(name: str, checkpoint: Path, device: str, threads: int, progress: bool,
                 build: BundleBuilder | None = None) -> tuple[Ranker, float]:
    """The ranker a backend name stands for, and its size on disk (or in memory for torch) in MB.
    ``ort-<fp32|fp16|nf4|int4|int8>[-native|-int8]``: a bundle exported from ``checkpoint``
    into the bundle cache on first use; the suffix picks the engine's compute route."""
    if name in TORCH_BACKENDS:
        import torch

        torch.set_num_threads(threads)
        ranker = Ranker.from_checkpoint(checkpoint, bf16=name == "torch-bf16", nf4=name == "torch-nf4")
        model = ranker.backend.model  # type: ignore[attr-defined]
        size = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        return ranker, size / 1e6
    parts = name.split("-")
    if parts[0] != "ort" or len(parts) not in (2, 3) or parts[1] not in ORT_QUANTS or (len(parts) == 3 and parts[2] not in ("native", "int8")):
        raise InputError(f"backend {name!r}: expected one of {TORCH_BACKENDS} or ort-<fp32|fp16|nf4|int4|int8>[-native|-int8]")
    quant, dtype = ORT_QUANTS[parts[1]], "fp16" if parts[1] == "fp16" else "fp32"
    compute = parts[2] if len(parts) == 3 else "auto"
    folder = cached_bundle(checkpoint, quant, dtype, progress, build)
    ranker = Ranker.from_bundle(folder, device, threads, compute)  # type: ignore[arg-type]
    return ranker, _folder_mb(folder)


def _requests(data: Dataset, w: Workload, seed: int, count: int) -> list[tuple[list[list[int]], list[list[int]]]]:
    """``count`` seeded requests: (histories, candidate lists) of ``w.batch`` users each."""
    rng = random.Random(f"{seed}-{w.name}")
    examples = [ex for ex in data.split("test", w.history) if len(ex.history) >= w.history]
    catalog = data.catalog
    if len(examples) < w.batch:
        raise InputError(f"workload {w.name}: only {len(examples)} test users have {w.history} history items, "
                         f"the batch needs {w.batch}")
    if w.candidates > len(catalog):
        raise InputError(f"workload {w.name}: {w.candidates} candidates, but the catalog has {len(catalog)} items")
    out = []
    for _ in range(count):
        users = rng.sample(examples, w.batch)
        histories = [[catalog.index(i) for i in ex.history] for ex in users]
        cands: list[list[int]] = []
        for ex in users:
            if w.kind == "candidates":
                target = catalog.index(ex.target)
                pool = [i for i in rng.sample(range(len(catalog)), w.candidates) if i != target]
                cands.append([target] + pool[: w.candidates - 1])
        out.append((histories, cands))
    return out


def _all_history(ranker: Ranker) -> PromptBuilder:
    """The ranker's prompt builder with the model's ``max_history`` lifted: 20 items are 20."""
    return PromptBuilder(ranker.prompts.tokenizer, ranker.prompts.eos_id, max_history=0, template=ranker.prompts.template)


def _runner(ranker: Ranker, w: Workload) -> Callable[[list[list[int]], list[list[int]]], None]:
    """One request of ``w`` on ``ranker``: the shared ranking code, every history item kept."""
    prompts = _all_history(ranker)
    if w.kind == "candidates":
        return lambda h, c: score_candidates(ranker.backend, prompts, [ranker.titles(x) for x in h], [ranker.titles(x) for x in c])  # type: ignore[return-value]
    return lambda h, _: beam_search(ranker.backend, prompts, ranker.trie, [ranker.titles(x) for x in h], k=w.k)  # type: ignore[return-value]


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


def run_bench(cfg: BenchConfig, data: Dataset, progress: bool = True) -> dict[str, Any]:
    """Run every backend on every workload; returns the JSON-able report."""
    if model_kind(cfg.checkpoint) != "checkpoint":
        raise InputError(f"{cfg.checkpoint}: bench needs a checkpoint folder (it builds every bundle from it)")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, str(cfg.threads))
    requests = {w.name: _requests(data, w, cfg.seed, cfg.max_repeats + 1) for w in cfg.workloads}
    runs: list[BackendRun] = []
    bar = tqdm(total=len(cfg.backends) * len(cfg.workloads), desc="bench", unit="run", disable=not progress)
    for name in cfg.backends:
        _reset_peak_rss()
        gpu_before = _gpu_mem_mb() if cfg.device == "cuda" else None
        start = time.perf_counter()
        ranker, size = open_backend(name, cfg.checkpoint, cfg.device, cfg.threads, progress, cfg.build)
        load_s = time.perf_counter() - start
        if data.catalog.item_ids != ranker.catalog.item_ids:
            raise InputError(f"{cfg.checkpoint}: its catalog differs from the benchmark data set")
        counter = _TokenCounter(ranker.backend)
        ranker.backend = counter  # type: ignore[assignment]
        ranker.trie  # built outside the timings (as a server would at start-up)
        run = BackendRun(name, round(load_s, 3), round(size, 1), 0.0, None)
        for w in cfg.workloads:
            bar.set_postfix_str(f"{name} {w.name}")
            go, reqs = _runner(ranker, w), requests[w.name]
            go(*reqs[-1])  # warm-up
            counter.tokens = 0
            latencies: list[float] = []
            began = time.perf_counter()
            while len(latencies) < cfg.max_repeats and (len(latencies) < cfg.min_repeats or time.perf_counter() - began < cfg.seconds):
                t = time.perf_counter()
                go(*reqs[len(latencies)])
                latencies.append((time.perf_counter() - t) * 1000)
            run.results.append(Result(name, w.name, [round(x, 3) for x in latencies], counter.tokens // len(latencies)).finish(w.batch))
            bar.update()
        run.peak_rss_mb = round(_rss_mb("VmHWM"), 1)
        if gpu_before is not None:
            after = _gpu_mem_mb()
            run.gpu_mem_mb = None if after is None else after - gpu_before
        runs.append(run)
        del ranker, counter
    bar.close()
    paired = run_paired(cfg, requests, runs, progress) if cfg.paired else []
    return {
        "config": {"checkpoint": str(cfg.checkpoint), "device": cfg.device, "threads": cfg.threads,
                   "min_repeats": cfg.min_repeats, "max_repeats": cfg.max_repeats, "seconds": cfg.seconds, "seed": cfg.seed,
                   "paired_rounds": cfg.paired, "workloads": [asdict(w) | {"name": w.name} for w in cfg.workloads]},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "versions": _versions()},
        "backends": [asdict(r) for r in runs],
        "paired": [asdict(r) for r in paired],
        # the verdict from the paired check when it ran (drift cancels there), else from the table
        "targets": targets(paired) if paired else targets(runs),
        "targets_sequential": targets(runs),
    }


def _contenders(runs: Sequence[BackendRun]) -> dict[str, list[str]]:
    """Target workload -> the backends its verdict compares (see :func:`targets`): the PyTorch
    references present and the ORT backend the table picks (4-bit at rest for candidates)."""
    torch_names = [r.name for r in runs if r.name in TORCH_BACKENDS]
    out = {}
    for workload, pool in ((CAND_TARGET, [r.name for r in runs if r.name.startswith(("ort-int4", "ort-nf4"))]),
                           (TOPK_TARGET, [r.name for r in runs if r.name.startswith("ort-")])):
        timed = [n for n in pool if _p50(runs, n, workload) is not None]
        refs = [n for n in torch_names if _p50(runs, n, workload) is not None]
        if timed and refs:
            out[workload] = refs + [min(timed, key=lambda n: _p50(runs, n, workload))]  # type: ignore[arg-type, return-value]
    return out


def run_paired(cfg: BenchConfig, requests: dict[str, list[Any]], runs: Sequence[BackendRun],
               progress: bool = True) -> list[BackendRun]:
    """The target comparisons again, with the contenders loaded side by side and taking turns
    request by request (the order rotating each round), ``cfg.paired`` rounds per workload.

    Why: on a shared machine the speed drifts by 10-20% over minutes, so two backends timed
    minutes apart can differ by that much for no reason of their own; taking turns puts both
    under the same drift."""
    plan = _contenders(runs)
    names = list(dict.fromkeys(n for group in plan.values() for n in group))
    rankers = {n: open_backend(n, cfg.checkpoint, cfg.device, cfg.threads, progress, cfg.build)[0] for n in names}
    out = {n: BackendRun(n, 0.0, 0.0, 0.0, None) for n in names}
    workloads = {w.name: w for w in cfg.workloads}
    rounds = min(cfg.paired, cfg.max_repeats)
    bar = tqdm(total=rounds * sum(len(g) for g in plan.values()), desc="paired", unit="req", disable=not progress)
    for wname, group in plan.items():
        w, reqs = workloads[wname], requests[wname]
        go = {n: _runner(rankers[n], w) for n in group}
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


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("onnxruntime", "onnxruntime-gpu", "torch", "transformers", "bitsandbytes"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _p50(runs: Sequence[BackendRun], backend: str, workload: str) -> float | None:
    for run in runs:
        if run.name == backend:
            for r in run.results:
                if r.workload == workload:
                    return r.p50_ms
    return None


def targets(runs: Sequence[BackendRun]) -> dict[str, Any]:
    """The issue's targets, read off this run: the fastest 4-bit-at-rest ORT backend against
    PyTorch fp32 / bf16 / NF4 on 20 history items x 100 candidates, and full-catalog top-10
    against PyTorch fp32 (batch 1). Missing figures are left out."""
    out: dict[str, Any] = {}
    cand, topk = CAND_TARGET, TOPK_TARGET
    four_bit = [r.name for r in runs if r.name.startswith(("ort-int4", "ort-nf4"))]
    best = min(four_bit, key=lambda n: _p50(runs, n, cand) or float("inf"), default=None)
    if best is not None and _p50(runs, best, cand) is not None:
        ours = _p50(runs, best, cand)
        out["candidates"] = {"backend": best, "p50_ms": ours}
        for ref in TORCH_BACKENDS:
            theirs = _p50(runs, ref, cand)
            if theirs is not None and ours:
                out["candidates"][f"speedup_vs_{ref}"] = round(theirs / ours, 2)
        out["candidates"]["target_met"] = (out["candidates"].get("speedup_vs_torch-fp32", 0) >= 3
                                           and all(out["candidates"].get(f"speedup_vs_{r}", 2) > 1 for r in TORCH_BACKENDS))
    fastest = min((r.name for r in runs if r.name.startswith("ort-")), key=lambda n: _p50(runs, n, topk) or float("inf"), default=None)
    theirs = _p50(runs, "torch-fp32", topk)
    if fastest is not None and theirs is not None and _p50(runs, fastest, topk):
        speedup = theirs / _p50(runs, fastest, topk)  # type: ignore[operator]
        out["topk"] = {"backend": fastest, "p50_ms": _p50(runs, fastest, topk), "speedup_vs_torch-fp32": round(speedup, 2),
                       "target_met": speedup >= 2}
    return out


def table(report: dict[str, Any]) -> str:
    """A plain-text table: one line per backend and workload."""
    head = f"{'backend':<16} {'workload':<16} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'req/s':>7} {'tok/s':>8} {'n':>3}"
    lines = [head, "-" * len(head)]
    for run in report["backends"]:
        for r in run["results"]:
            lines.append(f"{run['name']:<16} {r['workload']:<16} {r['p50_ms']:>9.1f} {r['p95_ms']:>9.1f} {r['p99_ms']:>9.1f} "
                         f"{r['requests_per_s']:>7.2f} {r['tokens_per_s']:>8.0f} {len(r['latencies_ms']):>3}")
    lines.append("")
    lines.append(f"{'backend':<16} {'load s':>7} {'size MB':>8} {'peak RSS MB':>12}")
    for run in report["backends"]:
        lines.append(f"{run['name']:<16} {run['load_s']:>7.2f} {run['size_mb']:>8.1f} {run['peak_rss_mb']:>12.0f}")
    if report.get("paired"):
        lines += ["", f"paired check: the contenders take turns request by request, {report['config']['paired_rounds']} rounds",
                  f"{'backend':<16} {'workload':<16} {'p50 ms':>9} {'p95 ms':>9}"]
        for run in report["paired"]:
            for r in run["results"]:
                lines.append(f"{run['name']:<16} {r['workload']:<16} {r['p50_ms']:>9.1f} {r['p95_ms']:>9.1f}")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> Path:
    """Latency distribution per backend, one panel per workload (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = [w["name"] for w in report["config"]["workloads"]]
    names = [r["name"] for r in report["backends"]]
    cols = 4
    rows = -(-len(workloads) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 0.35 * len(names) * rows + 1.5 * rows), squeeze=False)
    for ax, wname in zip(axes.flat, workloads):
        data = [next(r["latencies_ms"] for r in run["results"] if r["workload"] == wname) for run in report["backends"]]
        ax.boxplot(data, orientation="horizontal", widths=0.6, showfliers=True)
        ax.set_yticks(range(1, len(names) + 1), names, fontsize=7)
        ax.set_xscale("log")
        ax.set_title(wname, fontsize=9)
        ax.set_xlabel("latency per request (ms)", fontsize=7)
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(workloads):]:
        ax.axis("off")
    cfg = report["config"]
    fig.suptitle(f"hatllm-edge bench: {cfg['device']}, {cfg['threads']} threads", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class _FullLogits:
    """Ablation: candidate scores from [B, Q, V] logits handed back and log-softmaxed in NumPy,
    as the engine did before the graph returned the targets' log-probabilities."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def token_logprobs(self, input_ids: np.ndarray, position_ids: np.ndarray, masks: Any, cache: Any,
                       targets: np.ndarray) -> tuple[np.ndarray, Any]:
        logits, cache = self.backend.forward(input_ids, position_ids, masks, cache)
        return np.take_along_axis(log_softmax(logits), targets[..., None], axis=2)[..., 0], cache


# (name, what changes against the shipped engine: int4 bundle, int8 compute, all graph
# optimisations, the bench's threads, balanced rows of PACK_TOKENS, prompts padded to multiples of
# PROMPT_BUCKET, log-probs computed in the graph)
ABLATIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("shipped engine", {}),
    ("4-bit MatMulNBits compute (no int8 expansion)", {"compute": "native"}),
    ("int8 with one activation scale per tensor (DynamicQuantizeMatMul)", {"compute": "int8-tensor"}),
    ("fp32 bundle", {"quant": "none", "compute": "native"}),
    ("graph optimisations: basic", {"optimization": "basic"}),
    ("graph optimisations: none", {"optimization": "none"}),
    ("1 thread", {"threads": 1}),
    ("one row per candidate (prompt cache copied per candidate)", {"pack_tokens": 1}),
    ("all candidates in one packed row", {"pack_tokens": 1 << 20, "pass_tokens": 1 << 20}),
    ("rows filled in order, not balanced", {"balanced": False}),
    ("rows of 64 tokens", {"pack_tokens": 64}),
    ("rows of 256 tokens", {"pack_tokens": 256}),
    ("prompts padded to their own length, not a multiple of 16", {"bucket": 1}),
    ("full logits back to NumPy, log-softmax there", {"full_logits": True}),
)


def _ablation_runner(checkpoint: Path, change: dict[str, Any], threads: int, progress: bool,
                     build: BundleBuilder | None) -> Callable[[list[list[int]], list[list[int]]], np.ndarray]:
    """One variant of :data:`ABLATIONS` opened: a request -> every user's candidate scores
    (in candidate order, concatenated)."""
    folder = cached_bundle(checkpoint, change.get("quant", "int4"), progress=progress, build=build)
    ranker = Ranker.from_bundle(folder, "cpu", change.get("threads", threads), change.get("compute", "int8"),
                                change.get("optimization", "all"))
    backend: Any = _FullLogits(ranker.backend) if change.get("full_logits") else ranker.backend
    prompts = _all_history(ranker)

    def go(histories: list[list[int]], cands: list[list[int]]) -> np.ndarray:
        ranked = score_candidates(backend, prompts, [ranker.titles(h) for h in histories], [ranker.titles(c) for c in cands],
                                  pack_tokens=change.get("pack_tokens", PACK_TOKENS), pass_tokens=change.get("pass_tokens", PASS_TOKENS),
                                  balanced=change.get("balanced", True), bucket=change.get("bucket", PROMPT_BUCKET))
        return np.concatenate([np.asarray(r.scores)[np.argsort(r.items)] for r in ranked])

    return go


def run_ablation(checkpoint: Path, data: Dataset, workload: Workload, threads: int = 2, repeats: int = 5,
                 seed: int = 0, progress: bool = True, only: Sequence[str] = (),
                 build: BundleBuilder | None = None) -> list[dict[str, Any]]:
    """Each engine step's effect: the shipped engine on ``workload``, and with one step undone
    at a time (see :data:`ABLATIONS`), ``repeats`` timed requests each.

    Each variant takes turns with the shipped engine request by request, so the machine's
    drift hits both alike: "x shipped" is the median over requests of the variant's time over
    the shipped engine's on the same request, and the shipped row pools all its turns. ``only``:
    the variants whose name contains one of these words (default: all)."""
    if workload.kind != "candidates":
        raise InputError(f"ablation workload {workload.name}: needs a candidate workload (cand<C>-h<H>-b<B>)")
    reqs = _requests(data, workload, seed, repeats + 1)
    (shipped_name, _), variants = ABLATIONS[0], [v for v in ABLATIONS[1:] if not only or any(w in v[0] for w in only)]
    if not variants:
        raise InputError(f"no ablation variant's name contains any of {list(only)}; names: {[n for n, _ in ABLATIONS[1:]]}")
    shipped = _ablation_runner(checkpoint, {}, threads, progress, build)
    shipped(*reqs[-1])  # warm-up
    base_scores = shipped(*reqs[0])
    pooled: list[float] = []
    rows = []
    for name, change in tqdm(variants, desc="ablation", disable=not progress):
        variant = _ablation_runner(checkpoint, change, threads, progress, build)
        variant(*reqs[-1])
        times: dict[str, list[float]] = {"variant": [], "shipped": []}
        scores = None
        for i, (h, c) in enumerate(reqs[:repeats]):
            for who in (("shipped", "variant") if i % 2 == 0 else ("variant", "shipped")):
                t = time.perf_counter()
                got = (variant if who == "variant" else shipped)(h, c)
                times[who].append(round((time.perf_counter() - t) * 1000, 3))
                if who == "variant" and scores is None:
                    scores = got
        pooled += times["shipped"]
        ratio = np.asarray(times["variant"]) / np.asarray(times["shipped"])
        # layout and plumbing change no score under native compute; under int8 compute their
        # last-ulp differences can flip rounded activation codes (docs/results.md, "Latency")
        rows.append({"variant": name, "change": change, "p50_ms": float(np.median(times["variant"])),
                     "latencies_ms": times["variant"], "shipped_latencies_ms": times["shipped"],
                     "vs_shipped": round(float(np.median(ratio)), 2),
                     "max_score_diff": float(np.abs(scores - base_scores).max())})  # type: ignore[operator]
        del variant
    head = {"variant": shipped_name, "change": {}, "p50_ms": float(np.median(pooled)), "latencies_ms": pooled,
            "vs_shipped": 1.0, "max_score_diff": 0.0}
    return [head] + rows


def ablation_table(rows: list[dict[str, Any]]) -> str:
    w = max(len("variant"), *(len(r["variant"]) for r in rows))
    lines = [f"{'variant':<{w}} {'p50 ms':>9} {'x shipped':>10} {'max |score diff|':>17}"]
    lines += [f"{r['variant']:<{w}} {r['p50_ms']:>9.1f} {r['vs_shipped']:>10.2f} {r['max_score_diff']:>17.2g}" for r in rows]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "bench.json"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    return json_path, plot(report, out_dir / "bench.png")
