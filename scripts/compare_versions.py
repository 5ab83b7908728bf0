"""Time one workload on the engine of a given source tree: run it alternately for two trees (an
older commit checked out with `git worktree add`, and this one), each with a bundle its own
exporter built (or the same bundle where the graph contract did not change), to see whether a
change moved the speed, the memory or the lists.

    python scripts/compare_versions.py ROOT BUNDLE COMPUTE WORKLOAD N [--lists OUT.json]
    e.g. python scripts/compare_versions.py /tmp/old bundles/old-int4 int8 cand100-h20-b1 4

Prints one JSON line: p50 and every request's ms (after one warm-up request), and the process's
peak resident memory. ``--lists``: also write every request's ranked lists (items, scores), to
compare two trees' results."""

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", help="source tree whose hatllm_edge runs")
    ap.add_argument("bundle", type=Path)
    ap.add_argument("compute", choices=["int8", "native"])
    ap.add_argument("workload", help="e.g. top10-h20-b8 or cand100-h20-b1")
    ap.add_argument("count", type=int, help="timed requests")
    ap.add_argument("--lists", type=Path, help="write each request's ranked lists here")
    args = ap.parse_args()
    sys.path.insert(0, args.root)  # that tree's hatllm_edge, not the installed one: imported only now

    import numpy as np

    from hatllm_edge.bench.backends import runner
    from hatllm_edge.bench.workloads import Workload, make_requests
    from hatllm_edge.core.data import load_dataset
    from hatllm_edge.core.machine import peak_rss_mib
    from hatllm_edge.ranking.ranker import Ranker

    ranker = Ranker.from_bundle(args.bundle, "cpu", 2, args.compute)
    w = Workload.parse(args.workload)
    requests = make_requests(load_dataset("ml-100k", None, None), w, 0, args.count + 1)
    go = runner(ranker, w)
    go(*requests[-1])
    times, lists = [], []
    for histories, cands in requests[: args.count]:
        t = time.perf_counter()
        ranked = go(histories, cands)
        times.append((time.perf_counter() - t) * 1000)
        lists.append([[r.items, r.scores] for r in ranked])  # type: ignore[attr-defined]
    if args.lists:
        args.lists.write_text(json.dumps(lists))
    print(json.dumps({"root": args.root, "compute": args.compute, "workload": args.workload, "p50_ms": float(np.median(times)),
                      "ms": [round(x) for x in times], "peak_rss_mib": round(peak_rss_mib())}))


if __name__ == "__main__":
    main()
