"""Time one workload on the engine of a given source tree: run it alternately for two trees (an
older commit checked out with `git worktree add`, and this one), each with a bundle its own
exporter built, to see whether a change moved the speed.

    python scripts/compare_versions.py ROOT BUNDLE COMPUTE WORKLOAD N
    e.g. python scripts/compare_versions.py /tmp/old bundles/old-int4 int8 cand100-h20-b1 4

Prints one JSON line: p50 and every request's ms (after one warm-up request)."""

import json
import sys
import time
from pathlib import Path

root, bundle, compute, workload, count = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
sys.path.insert(0, root)  # that tree's hatllm_edge, not the installed one

import numpy as np  # noqa: E402

from hatllm_edge.bench.backends import runner  # noqa: E402
from hatllm_edge.bench.workloads import Workload, make_requests  # noqa: E402
from hatllm_edge.core.data import load_dataset  # noqa: E402
from hatllm_edge.ranking.ranker import Ranker  # noqa: E402

ranker = Ranker.from_bundle(bundle, "cpu", 2, compute)
w = Workload.parse(workload)
requests = make_requests(load_dataset("ml-100k", None, None), w, 0, count + 1)
go = runner(ranker, w)
go(*requests[-1])
times = []
for histories, cands in requests[:count]:
    t = time.perf_counter()
    go(histories, cands)
    times.append((time.perf_counter() - t) * 1000)
print(json.dumps({"root": root, "compute": compute, "workload": workload, "p50_ms": float(np.median(times)),
                  "ms": [round(x) for x in times]}))
