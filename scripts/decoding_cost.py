"""What trie renormalisation costs at ranking time, raw and renormalised side by side.

Seeded test users of ml-100k, each with the target plus random candidates: candidate scoring
and full-catalog top-10 (10 beams), the LLM alone, once with raw steps and once with
renormalised ones, taking turns request by request (the order alternating) so that the
machine's drift hits both alike. Renormalised candidate scoring reads the full logits of every
answer position (to normalise over each trie node's children) where raw scoring reads one
log-probability per position, computed in the graph.

    python scripts/decoding_cost.py BUNDLE --users 20 --out results/engine/decoding_cost.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

from hatllm_edge.app.models import open_model
from hatllm_edge.core.data import candidate_set, load_dataset
from hatllm_edge.core.machine import cpu_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    ranker = open_model(args.bundle, threads=args.threads)
    data = load_dataset()
    rng = random.Random(args.seed)
    examples = rng.sample(data.split("test", ranker.prompts.max_history), args.users)
    requests = []
    for ex in examples:
        requests.append(([data.catalog.index(i) for i in ex.history],
                         candidate_set(len(data.catalog), data.catalog.index(ex.target), args.candidates, rng)))
    ranker.score(*requests[0], assist=False)  # warm-up: session arenas, the title tree
    ranker.top_k([requests[0][0]], assist=False)
    times: dict[str, dict[bool, list[float]]] = {"candidates": {False: [], True: []}, "top10": {False: [], True: []}}
    for n, (history, candidates) in enumerate(requests):
        for renormalise in ((False, True) if n % 2 == 0 else (True, False)):
            t0 = time.perf_counter()
            ranker.score(history, candidates, assist=False, renormalise=renormalise)
            times["candidates"][renormalise].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ranker.top_k([history], k=10, beams=10, assist=False, renormalise=renormalise)
            times["top10"][renormalise].append(time.perf_counter() - t0)
    rows = {}
    for workload, by in times.items():
        raw, renorm = np.asarray(by[False]) * 1e3, np.asarray(by[True]) * 1e3
        rows[workload] = {"raw_p50_ms": round(float(np.median(raw)), 1), "renormalised_p50_ms": round(float(np.median(renorm)), 1),
                          "renormalised_over_raw": round(float(np.median(renorm / raw)), 3)}
        print(f"{workload:<10} raw p50 {rows[workload]['raw_p50_ms']:8.1f} ms  renormalised p50 "
              f"{rows[workload]['renormalised_p50_ms']:8.1f} ms  ratio (median per request) {rows[workload]['renormalised_over_raw']:.3f}")
    result = {"bundle": str(args.bundle), "backend": ranker.label, "cpu": cpu_name(), "threads": args.threads,
              "users": args.users, "candidates": args.candidates, "seed": args.seed, "workloads": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
