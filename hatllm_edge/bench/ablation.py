"""Each engine step's effect: the shipped engine, and with one step undone at a time, taking
turns request by request."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from hatllm_edge.app.models import BundleBuilder, cached_bundle
from hatllm_edge.bench.backends import all_history
from hatllm_edge.bench.workloads import Workload, make_requests
from hatllm_edge.core.data import Dataset
from hatllm_edge.core.errors import InputError
from hatllm_edge.ranking.candidates import PACK_TOKENS, score_candidates
from hatllm_edge.ranking.prefill import PROMPT_BUCKET
from hatllm_edge.ranking.ranker import Ranker
from hatllm_edge.ranking.scoring import log_softmax


class _FullLogits:
    """Ablation: candidate scores from [B, Q, V] logits handed back and log-softmaxed in NumPy,
    as the engine did before the graph returned the targets' log-probabilities."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def token_logprobs(self, input_ids: np.ndarray, position_ids: np.ndarray, masks: Any, cache: Any,
                       targets: np.ndarray, rows: np.ndarray | None = None) -> tuple[np.ndarray, Any]:
        logits, cache = self.backend.forward(input_ids, position_ids, masks, cache, rows=rows)
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
    prompts = all_history(ranker)

    def go(histories: list[list[int]], cands: list[list[int]]) -> np.ndarray:
        ranked = score_candidates(backend, prompts, [ranker.titles(h) for h in histories], [ranker.titles(c) for c in cands],
                                  pack_tokens=change.get("pack_tokens", PACK_TOKENS), pass_tokens=change.get("pass_tokens"),
                                  balanced=change.get("balanced", True), bucket=change.get("bucket", PROMPT_BUCKET))
        return np.concatenate([r.by_position() for r in ranked])

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
    reqs = make_requests(data, workload, seed, repeats + 1)
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


