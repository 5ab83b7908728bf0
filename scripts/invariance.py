"""Does a user's result depend on who shares the batch, or on candidate order?

Seeded ml-100k test users with histories of different lengths (so their prompts differ in
length), each with seeded random candidates. Prints, for one bundle and compute route:
candidate scores batched vs alone, candidates reversed vs in order, copies of one item,
full-catalog top-k batched vs alone, and (with ``--reference``) the mean score distance to
another route (e.g. int8 against native).

    python scripts/invariance.py BUNDLE --compute int8 --reference native
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

from hatllm_edge.core.data import load_dataset
from hatllm_edge.ranking.ranker import Ranker


def probe(ranker: Ranker, histories: list[list[int]], candidates: list[list[int]], k: int) -> dict:
    alone = [ranker.score(h, c) for h, c in zip(histories, candidates)]
    batched = ranker.score_batch(histories, candidates)
    reversed_ = [ranker.score(h, c[::-1]) for h, c in zip(histories, candidates)]
    out: dict = {
        "batched_vs_alone_max": max(float(np.abs(a.by_position() - b.by_position()).max()) for a, b in zip(alone, batched)),
        "batched_vs_alone_top10_differ": sum(a.items[:10] != b.items[:10] for a, b in zip(alone, batched)),
        "reversed_vs_in_order_max": max(float(np.abs(a.by_position() - r.by_position()[::-1]).max())
                                        for a, r in zip(alone, reversed_)),
    }
    copies = ranker.score(histories[0], [candidates[0][0]] * 4)
    out["four_copies_spread"] = float(np.ptp(copies.scores))
    top_alone = [ranker.top_k([h], k=k)[0] for h in histories]
    top_batched = ranker.top_k(histories, k=k)
    out["topk_batched_vs_alone_lists_differ"] = sum(a.items != b.items for a, b in zip(top_alone, top_batched))
    out["topk_batched_vs_alone_max"] = max(
        (abs(sa - sb) for a, b in zip(top_alone, top_batched) for i, sa in zip(a.items, a.scores)
         for j, sb in zip(b.items, b.scores) if i == j), default=0.0)
    out["alone_scores"] = [a.by_position().tolist() for a in alone]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--compute", default="auto")
    parser.add_argument("--reference", default=None, help="a second compute route to measure the score distance to")
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--candidates", type=int, default=30)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    ranker = Ranker.from_bundle(args.bundle, threads=args.threads, compute=args.compute)
    dataset = load_dataset()
    rng = random.Random(args.seed)
    examples = rng.sample(dataset.split("test", 1000), args.users)
    n = len(ranker.catalog)
    histories, candidates = [], []
    for u, ex in enumerate(examples):
        length = 2 + (u * 7) % 9  # 2..10 items: prompts of different lengths
        histories.append([ranker.catalog.index(i) for i in ex.history[-length:]])
        candidates.append(rng.sample(range(n), args.candidates))
    result = {"bundle": str(args.bundle), "compute": ranker.backend.compute,  # type: ignore[attr-defined]
              "prompt_tokens": [len(ranker.prompts.prompt(ranker.titles(h))) for h in histories]}
    result |= probe(ranker, histories, candidates, args.k)
    if args.reference:
        other = Ranker.from_bundle(args.bundle, threads=args.threads, compute=args.reference)
        ref = [other.score(h, c).by_position() for h, c in zip(histories, candidates)]
        diffs = np.concatenate([np.abs(np.asarray(a) - b) for a, b in zip(result["alone_scores"], ref)])
        result["vs_reference"] = {"route": args.reference, "mean": float(diffs.mean()), "max": float(diffs.max())}
    result.pop("alone_scores")
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
