"""The CUDA route's check, in two halves that run on two machines (driven by gpu_check.sh).

``reference`` (here, on the CPU): seeded requests and the CPU fp32 native engine's answers to
them, in one JSON that travels to the GPU host, which then needs neither the data set nor the
training stack:
  - parity: 100 seeded test users, 100 candidates each (the target and seeded catalog items),
    scored as ``rank`` scores them (the model's decoding, fused); full-catalog top-10 for the
    same users;
  - latency: seeded requests for each workload of :data:`WORKLOADS`.

``check`` (on the GPU host): the same requests on the CUDA engine. Parity: per user, top-10
agreement, Kendall's tau of the candidate scores, max |score difference|; latency per workload
(p50, p90, users/s, runs per request, GPU memory), with and without CUDA graphs; the GPU's name
and driver. Writes ``parity.json`` and ``latency.json`` under ``--out``.

    python scripts/gpu_check.py reference BUNDLE_FP32 .gpu-check/reference.json
    python scripts/gpu_check.py check BUNDLE_FP16 .gpu-check/reference.json --out results/gpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hatllm_edge.bench.backends import runner  # noqa: E402
from hatllm_edge.bench.workloads import Workload  # noqa: E402
from hatllm_edge.ranking.ranker import Ranker  # noqa: E402

WORKLOADS = ("cand100-h20-b1", "cand20-h5-b1", "cand100-h20-b8", "cand100-h20-b32", "top10-h10-b1", "top10-h10-b8",
             "top10-h10-b32")
PARITY_USERS, PARITY_CANDIDATES, REQUESTS = 100, 100, 12


def reference(bundle: Path, out: Path, threads: int) -> None:
    from tqdm import tqdm

    from hatllm_edge.bench.workloads import make_requests
    from hatllm_edge.core.data import load_dataset

    cpu = Ranker.from_bundle(bundle, "cpu", threads, compute="native")
    data = load_dataset("ml-100k", None, None)
    if data.catalog.item_ids != cpu.catalog.item_ids:
        raise SystemExit(f"{bundle}: its catalog is not MovieLens-100K's")
    users = [(h[0], c[0]) for h, c in make_requests(data, Workload("candidates", 20, 1, PARITY_CANDIDATES), 11, PARITY_USERS)]
    parity = []
    for history, cands in tqdm(users, desc="reference", unit="user"):
        scored = cpu.score_batch([history], [cands])[0]
        top = cpu.top_k([history], k=10)[0]
        parity.append({"history": history, "candidates": cands, "items": [cands[i] for i in scored.items],
                       "scores": scored.scores, "top10": top.items})
    workloads = {w: make_requests(data, Workload.parse(w), 0, REQUESTS) for w in WORKLOADS}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bundle": str(bundle), "label": cpu.label, "parity": parity, "workloads": workloads}))
    print(f"{out}: {len(parity)} parity users, {len(workloads)} workloads ({cpu.label})")


def gpu_info() -> dict[str, Any]:
    try:
        line = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20, check=True).stdout.strip().splitlines()[0]
        name, driver, memory = (x.strip() for x in line.split(","))
        return {"name": name, "driver": driver, "memory_total": memory}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
        return {"error": f"nvidia-smi: {e}"}


def gpu_mem_mb() -> float | None:
    try:
        return float(subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                    capture_output=True, text=True, timeout=20, check=True).stdout.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def parity(gpu: Ranker, ref: dict[str, Any]) -> dict[str, Any]:
    """Per user: the same top-10s, the largest score difference, and the GPU's candidate scores in
    the reference's order (Kendall's tau is computed from them by :func:`taus`, where scipy is)."""
    rows = []
    for user in ref["parity"]:
        got = gpu.score_batch([user["history"]], [user["candidates"]])[0]
        got_items = [user["candidates"][i] for i in got.items]
        have = dict(zip(got_items, got.scores))
        top = gpu.top_k([user["history"]], k=10)[0].items
        rows.append({"top10_same": got_items[:10] == user["items"][:10], "top1_same": got_items[0] == user["items"][0],
                     "full_catalog_top10_same": list(top) == user["top10"],
                     "scores": [float(have[k]) for k in user["items"]],
                     "max_abs": max(abs(w - have[k]) for k, w in zip(user["items"], user["scores"]))})
    return {"reference": ref["label"], "engine": gpu.label, "users": len(rows), "candidates": PARITY_CANDIDATES,
            "candidate_top10_same": sum(r["top10_same"] for r in rows), "top1_same": sum(r["top1_same"] for r in rows),
            "full_catalog_top10_same": sum(r["full_catalog_top10_same"] for r in rows),
            "max_abs_score_diff": max(r["max_abs"] for r in rows),
            "median_max_abs_score_diff": statistics.median(r["max_abs"] for r in rows),
            "per_user_scores": [r["scores"] for r in rows]}


def taus(result: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """Kendall's tau of each user's GPU scores against the reference's (needs scipy: the bare
    host may lack it, so ``check`` tries and the ``taus`` command finishes the file here)."""
    from hatllm_edge.evaluation.fidelity import kendall_tau

    values = [kendall_tau(np.asarray(user["scores"]), np.asarray(got))
              for user, got in zip(ref["parity"], result["per_user_scores"])]
    return {"tau_min": min(values), "tau_median": statistics.median(values)}


def latency(gpu: Ranker, ref: dict[str, Any], seconds: float) -> dict[str, Any]:
    out = {}
    for name, requests in ref["workloads"].items():
        w = Workload.parse(name)
        go = runner(gpu, w)
        go(*requests[0])
        go(*requests[1])  # warm-up (and CUDA graph capture)
        before, times = gpu.backend.runs, []
        stop = time.perf_counter() + seconds
        for histories, cands in requests[2:]:
            t = time.perf_counter()
            go(histories, cands)
            times.append((time.perf_counter() - t) * 1000)
            if time.perf_counter() > stop:
                break
        p50 = float(np.percentile(times, 50))
        out[name] = {"p50_ms": round(p50, 3), "p90_ms": round(float(np.percentile(times, 90)), 3), "n": len(times),
                     "users_per_s": round(w.batch * 1000 / p50, 1),
                     "runs_per_request": round((gpu.backend.runs - before) / len(times), 2),
                     "gpu_mem_used_mb": gpu_mem_mb()}
        print(name, json.dumps(out[name]), flush=True)
    return out


def check(bundle: Path, ref_path: Path, out: Path, seconds: float) -> int:
    ref = json.loads(ref_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    gpu = Ranker.from_bundle(bundle, "cuda")  # the provider warning is ONNX Runtime's own stderr: gpu_check.sh checks it
    info = {"gpu": gpu_info(), "engine": gpu.label}
    print(json.dumps(info), flush=True)
    result = parity(gpu, ref)
    try:
        result |= taus(result, ref)
    except ImportError as e:
        result["tau"] = f"not computed here ({e}): python scripts/gpu_check.py taus {out / 'parity.json'} {ref_path}"
    print("parity", json.dumps({k: v for k, v in result.items() if k != "per_user_scores"}), flush=True)
    (out / "parity.json").write_text(json.dumps(info | {"parity": result}, indent=1) + "\n")
    runs = {"plain": latency(gpu, ref, seconds)}
    try:
        graphed = Ranker.from_bundle(bundle, "cuda", cuda_graph=True)  # type: ignore[call-arg]
        runs["cuda_graph"] = latency(graphed, ref, seconds)
    except Exception as e:  # noqa: BLE001  (what capture refuses is the finding)
        runs["cuda_graph"] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"}
        print("cuda graph:", runs["cuda_graph"]["error"], flush=True)
    (out / "latency.json").write_text(json.dumps(info | {"latency": runs}, indent=1) + "\n")
    ok = result["candidate_top10_same"] >= 95 and "error" not in runs["plain"]
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reference")
    r.add_argument("bundle", type=Path)
    r.add_argument("out", type=Path)
    r.add_argument("--threads", type=int, default=2)
    c = sub.add_parser("check")
    c.add_argument("bundle", type=Path)
    c.add_argument("reference", type=Path)
    c.add_argument("--out", type=Path, default=Path("results/gpu"))
    c.add_argument("--seconds", type=float, default=6.0)
    t = sub.add_parser("taus", help="fill in Kendall's tau of a parity.json written where scipy was missing")
    t.add_argument("parity", type=Path)
    t.add_argument("reference", type=Path)
    args = ap.parse_args()
    if args.cmd == "reference":
        reference(args.bundle, args.out, args.threads)
        return 0
    if args.cmd == "taus":
        saved = json.loads(args.parity.read_text())
        saved["parity"] = {k: v for k, v in saved["parity"].items() if k != "tau"} | taus(saved["parity"], json.loads(args.reference.read_text()))
        args.parity.write_text(json.dumps(saved, indent=1) + "\n")
        print({k: saved["parity"][k] for k in ("tau_min", "tau_median")})
        return 0
    return check(args.bundle, args.reference, args.out, args.seconds)


if __name__ == "__main__":
    sys.exit(main())
