"""Load figures of `hatllm-edge serve` on this machine, bounded: requests/s and p50/p95 at
concurrency 1, 4 and 16 for candidate ranking and full-catalog top-10, against one
`hatllm-edge rank` process per request; memory per replica; what `--replicas auto` did under a
burst and after it; a burst past the queue bound.

    python scripts/serve_load.py bundles/hatllm-ml100k-int4 --out results/serving/load.json

Each server is a `hatllm-edge serve` subprocess (its own local Ray cluster), stopped with
SIGINT when its part is done.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from hatllm_edge.app.loadtest import LoadConfig, run_load, summary_line
from hatllm_edge.core.machine import cpu_name

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = {"candidates": ROOT / "examples" / "user_candidates.json", "top10": ROOT / "examples" / "user.json"}


def start(bundle: Path, port: int, *flags: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "hatllm_edge", "serve", "--model", str(bundle), "--port", str(port), "-q", *flags],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}/rank"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"serve exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    raise SystemExit("serve did not come up in 5 minutes")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def replicas() -> list[int]:
    """pids of this machine's replica processes (Ray names them ServeReplica:<app>:<deployment>)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("ray::ServeReplica:hatllm-edge:rank"):
            out.append(int(pid))
    return out


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def per_process(bundle: Path, body: Path, n: int) -> dict[str, Any]:
    """One `hatllm-edge rank` process per request, one after another: what serving replaces."""
    walls = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "hatllm_edge", "rank", str(body), "--model", str(bundle), "-q", "--threads", "2"],
                       cwd=ROOT, check=True, capture_output=True)
        walls.append(time.perf_counter() - t0)
    ms = np.array(walls) * 1000
    return {"requests": n, "requests_per_s": round(n / sum(walls), 3), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--scale-seconds", type=float, default=45.0, help="length of the burst that should scale up")
    ap.add_argument("--settle-seconds", type=float, default=90.0, help="how long to watch the replicas after the burst")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every request count (0.1: a smoke run)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    size = lambda n: max(2, int(n * args.scale))  # noqa: E731
    url = f"http://127.0.0.1:{args.port}/rank"
    result: dict[str, Any] = {"bundle": str(args.bundle), "cpu": cpu_name(),
                              "cores": os.cpu_count(), "load": [], "per_process": {}}

    # one replica with the machine's two cores, batches of up to 8
    server = start(args.bundle, args.port, "--threads", "2", "--max-batch", "8", "--max-queued", "32")
    try:
        pids = replicas()
        for name, body in WORKLOADS.items():
            for c in (1, 4, 16):
                n = size({1: 10, 4: 24, 16: 48}[c] if name == "top10" else {1: 20, 4: 48, 16: 96}[c])
                row = run_load(LoadConfig(url=url, bodies=(body.read_bytes(),), requests=n, concurrency=c, deadline_s=180))
                row["workload"] = name
                print(f"{name:>10} {summary_line(row)}", flush=True)
                result["load"].append(row)
        result["replica_rss_mib"] = [round(rss_mib(p), 1) for p in pids]
        with urllib.request.urlopen(url + "/stats") as r:
            result["replica_stats"] = json.loads(r.read())
        burst = run_load(LoadConfig(url=url, bodies=(WORKLOADS["candidates"].read_bytes(),), requests=size(200), concurrency=120,
                                    deadline_s=120))
        result["burst_past_queue"] = burst
        print(f"     burst {summary_line(burst)}", flush=True)
    finally:
        stop(server)
    for name, body in WORKLOADS.items():
        result["per_process"][name] = per_process(args.bundle, body, size(5))
        print(f"{name:>10} one process per request: {result['per_process'][name]}", flush=True)

    # autoscaling: replicas of one core each, from 1 up to 2 under a burst, back down after it
    server = start(args.bundle, args.port, "--threads", "1", "--replicas", "auto", "--max-replicas", "2", "--max-batch", "4")
    timeline = []
    try:
        t0 = time.perf_counter()
        load = threading.Thread(target=lambda: result.__setitem__("scale_burst", run_load(LoadConfig(
            url=url, bodies=(WORKLOADS["top10"].read_bytes(),), requests=10_000, concurrency=16, deadline_s=args.scale_seconds))))
        load.start()
        while load.is_alive() or time.perf_counter() - t0 < args.scale_seconds + args.settle_seconds:
            timeline.append({"t_s": round(time.perf_counter() - t0, 1), "replicas": len(replicas()), "loaded": load.is_alive()})
            time.sleep(3)
        load.join()
    finally:
        stop(server)
    result["autoscale"] = {"threads_per_replica": 1, "max_replicas": 2, "burst_s": args.scale_seconds,
                           "watched_s": args.scale_seconds + args.settle_seconds, "timeline": timeline,
                           "max_seen": max(r["replicas"] for r in timeline), "at_end": timeline[-1]["replicas"]}
    print(f"autoscale: max {result['autoscale']['max_seen']} replicas under load, {result['autoscale']['at_end']} at the end")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
