"""What does beam search lose? Exact scores of every catalog title against beams of several widths.

For a seeded sample of users of a split, every catalog title is scored exactly (the candidate
path: log p(title + end marker | prompt), all titles, which is what a beam of infinite width
would rank by), and full-catalog beam search runs at each width. Per width it reports how
often the target's exact rank is in the top 10 but the beam's list misses it, the NDCG@10 and
HR@10 of the beam against the exact ranking's, and the seconds per user; exact scoring's cost
too. The model's decoding defaults apply to both (trie renormalisation and the assistant's
share included): a candidate's score is what beam search gives its title.

    python scripts/beam_vs_exact.py MODEL --users 40 --beams 10,20,50 --out results/ml100k/beam_vs_exact.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hatllm_edge.app.models import bundle_builder
from hatllm_edge.app.rank import open_ranker
from hatllm_edge.core.data import load_dataset
from hatllm_edge.core.machine import cpu_name
from hatllm_edge.core.metrics import mean_metrics, target_rank
from hatllm_edge.ranking.loo import split_examples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="bundle or checkpoint (a checkpoint runs on its cached int4 bundle)")
    ap.add_argument("--users", type=int, default=40)
    ap.add_argument("--beams", default="10,20,50")
    ap.add_argument("--split", default="valid", choices=("valid", "test"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-assist", action="store_true", help="the LLM alone")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    ranker = open_ranker(args.model, "cpu", None, "onnx", args.threads, True, build=bundle_builder())
    assist = not args.no_assist
    renormalise, weight = ranker.scoring(assist)
    data = load_dataset()
    examples = split_examples(data, args.split, args.users, True, args.seed)
    everything = list(range(len(ranker.catalog)))
    exact_rank, exact_s = {}, 0.0
    for ex in examples:
        history = [ranker.catalog.index(i) for i in ex.history]
        t0 = time.perf_counter()
        ranked = ranker.score(history, everything, assist=assist)
        exact_s += time.perf_counter() - t0
        exact_rank[ex.user_id] = target_rank([ranker.catalog.item_ids[i] for i in ranked.items], ex.target)
    exact_top10 = [r if r is not None and r < 10 else None for r in exact_rank.values()]
    rows = []
    for width in (int(b) for b in args.beams.split(",")):
        beam_rank, t0 = {}, time.perf_counter()
        for ex in examples:
            history = [ranker.catalog.index(i) for i in ex.history]
            top = ranker.top_k([history], k=10, beams=width, assist=assist)[0]
            beam_rank[ex.user_id] = target_rank([ranker.catalog.item_ids[i] for i in top.items], ex.target)
        seconds = time.perf_counter() - t0
        lost = sum(1 for u, r in exact_rank.items() if r is not None and r < 10 and beam_rank[u] is None)
        rows.append({"beams": width, "metrics": mean_metrics(list(beam_rank.values())), "s_per_user": round(seconds / len(examples), 3),
                     "exact_top10_lost": lost, "exact_top10": sum(r is not None for r in exact_top10)})
    result = {"model": str(args.model), "backend": ranker.label, "renormalise": renormalise, "assistant_weight": weight, "split": args.split,
              "users": len(examples), "seed": args.seed, "cpu": cpu_name(),
              "exact": {"metrics": mean_metrics(exact_top10), "s_per_user": round(exact_s / len(examples), 3),
                        "ranks": exact_rank},
              "beams": rows}
    for row in rows:
        print(f"beams {row['beams']:>3}: NDCG@10 {row['metrics']['NDCG@10']:.4f} HR@10 {row['metrics']['HR@10']:.4f}; "
              f"exact top-10 hits lost {row['exact_top10_lost']}/{row['exact_top10']}; {row['s_per_user']:.2f} s/user")
    e = result["exact"]
    print(f"exact    : NDCG@10 {e['metrics']['NDCG@10']:.4f} HR@10 {e['metrics']['HR@10']:.4f}; {e['s_per_user']:.2f} s/user")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
