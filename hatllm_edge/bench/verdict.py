"""The verdict of a run: the fastest 4-bit-at-rest engine against the PyTorch references on the
candidate workload, and the fastest engine against PyTorch fp32 on full-catalog top-10, as
speed-up ratios. No thresholds here: the README says what the ratios mean."""

from __future__ import annotations

from typing import Any, Sequence

from hatllm_edge.bench import workloads
from hatllm_edge.bench.backends import TORCH_BACKENDS
from hatllm_edge.bench.records import BackendRun


def contenders(runs: Sequence[BackendRun]) -> dict[str, list[str]]:
    """Target workload -> the backends its verdict compares (see :func:`targets`): the PyTorch
    references present and the ORT backend the table picks (4-bit at rest for candidates)."""
    torch_names = [r.name for r in runs if r.name in TORCH_BACKENDS]
    out = {}
    for workload, pool in ((workloads.CAND_TARGET, [r.name for r in runs if r.name.startswith(("ort-int4", "ort-nf4"))]),
                           (workloads.TOPK_TARGET, [r.name for r in runs if r.name.startswith("ort-")])):
        timed = [n for n in pool if p50(runs, n, workload) is not None]
        refs = [n for n in torch_names if p50(runs, n, workload) is not None]
        if timed and refs:
            out[workload] = refs + [min(timed, key=lambda n: p50(runs, n, workload))]  # type: ignore[arg-type, return-value]
    return out


def p50(runs: Sequence[BackendRun], backend: str, workload: str) -> float | None:
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
    cand, topk = workloads.CAND_TARGET, workloads.TOPK_TARGET
    four_bit = [r.name for r in runs if r.name.startswith(("ort-int4", "ort-nf4"))]
    best = min(four_bit, key=lambda n: p50(runs, n, cand) or float("inf"), default=None)
    if best is not None and p50(runs, best, cand) is not None:
        ours = p50(runs, best, cand)
        out["candidates"] = {"backend": best, "p50_ms": ours}
        for ref in TORCH_BACKENDS:
            theirs = p50(runs, ref, cand)
            if theirs is not None and ours:
                out["candidates"][f"speedup_vs_{ref}"] = round(theirs / ours, 2)
    fastest = min((r.name for r in runs if r.name.startswith("ort-")), key=lambda n: p50(runs, n, topk) or float("inf"), default=None)
    theirs = p50(runs, "torch-fp32", topk)
    if fastest is not None and theirs is not None and p50(runs, fastest, topk):
        speedup = theirs / p50(runs, fastest, topk)  # type: ignore[operator]
        out["topk"] = {"backend": fastest, "p50_ms": p50(runs, fastest, topk), "speedup_vs_torch-fp32": round(speedup, 2)}
    return out


