"""Where an ONNX Runtime backend's time goes, by operator type, on one bench workload.

Seeded requests of the workload (those of ``hatllm-edge bench``, after one warm-up request)
through the shared ranking code with ONNX Runtime's profiler on (``$HATLLM_ORT_PROFILE``); prints each operator type's
share of the kernel time and the input shapes of the costliest operator. On a CPU with AMX the
int8 GEMMs are fast enough that attention, which ONNX Runtime computes in fp32, takes half the
time (docs/results.md, "On an Intel CPU with AMX").

    python scripts/op_profile.py cand100-h20-b1 --backend ort-int4 --requests 4 --out results/engine/intel_amx/ops_cand100-h20-b1.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from hatllm_edge.app.models import bundle_builder, default_checkpoint
from hatllm_edge.bench.backends import open_backend, runner
from hatllm_edge.bench.workloads import Workload, make_requests
from hatllm_edge.cli.common import write_json
from hatllm_edge.core.data import load_dataset
from hatllm_edge.core.machine import amx_tiles_granted, cpu_name
from hatllm_edge.engine.session import PROFILE_ENV


def summarise(events: list[dict[str, Any]], skip_runs: int = 0, top_shapes: int = 3) -> dict[str, Any]:
    """Kernel time per operator type (ms, share) and the costliest operator's input shapes,
    from the run after the first ``skip_runs`` (the warm-up's) on."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"), key=lambda e: e["ts"])
    start = runs[skip_runs]["ts"] if skip_runs < len(runs) else float("inf")
    runs = runs[skip_runs:]
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start]
    per_op: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    for e in kernels:
        per_op[e["args"]["op_name"]] += e["dur"]
        calls[e["args"]["op_name"]] += 1
    total = sum(per_op.values()) or 1
    top = per_op.most_common(1)[0][0] if per_op else None
    shapes: collections.Counter[str] = collections.Counter()
    for e in kernels:
        if e["args"]["op_name"] == top:
            shapes[json.dumps(e["args"].get("input_type_shape"))] += e["dur"]
    return {
        "runs": len(runs), "run_ms": sum(e["dur"] for e in runs) / 1e3, "kernel_ms": total / 1e3,
        "ops": [{"op": op, "ms": d / 1e3, "share": d / total, "calls_per_run": calls[op] / max(len(runs), 1)}
                for op, d in per_op.most_common()],
        "top_op_shapes": [{"ms": d / 1e3, "inputs": json.loads(s)} for s, d in shapes.most_common(top_shapes)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload", help="cand<C>-h<H>-b<B> or top<K>-h<H>-b<B>")
    ap.add_argument("--backend", default="ort-int4", help="an ort-* backend of hatllm-edge bench")
    ap.add_argument("--model", type=Path, help="checkpoint (default: the shipped model)")
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="JSON with the summary")
    args = ap.parse_args()
    if not args.backend.startswith("ort-"):
        ap.error(f"--backend {args.backend}: only ONNX Runtime backends (ort-...) have its profiler")
    workload = Workload.parse(args.workload)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ[PROFILE_ENV] = f"{tmp}/ort"
        try:
            ranker, _ = open_backend(args.backend, args.model or default_checkpoint(), "cpu", args.threads, True, bundle_builder())
        finally:
            del os.environ[PROFILE_ENV]
        request = runner(ranker, workload)
        *timed, warmup = make_requests(load_dataset(), workload, args.seed, args.requests + 1)  # as bench orders them
        request(*warmup)  # first runs of a shape allocate and plan: not what a served request costs
        skip = ranker.backend.runs
        for histories, candidates in timed:
            request(histories, candidates)
        events = json.loads(Path(ranker.backend.session.end_profiling()).read_text())
    summary = summarise(events, skip_runs=skip)
    result = {"workload": workload.name, "backend": args.backend, "requests": args.requests, "threads": args.threads,
              "cpu": cpu_name(), "amx_tiles_granted": amx_tiles_granted(), **summary}
    print(f"{workload.name} on {args.backend}, {args.requests} requests: {summary['runs']} graph runs, "
          f"{summary['run_ms']:.0f} ms in runs, {summary['kernel_ms']:.0f} ms in kernels ({cpu_name()})")
    for row in summary["ops"][:14]:
        print(f"  {row['op']:<26} {row['ms']:9.1f} ms  {100 * row['share']:5.1f}%  {row['calls_per_run']:6.1f} calls/run")
    for row in summary["top_op_shapes"]:
        print(f"  {row['ms']:9.1f} ms  {json.dumps(row['inputs'])}")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
