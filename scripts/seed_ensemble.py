"""Several fine-tunes of one recipe ranking as one: at every beam step each title token's
log-probability combines the members'. ``--combine product`` (a product of experts): the mean
of their log-probabilities (a geometric mean, which the renormalised beam normalises over the
catalog's titles), so a title needs every member's support. ``--combine mixture``: the log of
the mean of their probabilities, so one member's confident pick survives the others' doubt.
Two seeds of the same recipe hit different users (HatLLM's two seeds share 38 of their 76 and
81 test hits), which is what an ensemble can use; the weight-space mean of the seeds did not (``docs/training.md``). Each
member runs its own bundle and cache, so the cost is the members' sum.

The LLM alone, renormalised beams, on a seeded sample of users; each member alone is read from
its full evaluation (a user's list does not depend on the company it is ranked in), for a
paired bootstrap on the same users:

    python scripts/seed_ensemble.py bundles/hatllm_s0-int4 bundles/hatllm_s10-int4 --split valid --users 300 \
        --alone results/ml100k/eval_hatllm_s0_llm_valid.json results/ml100k/eval_hatllm_s10_llm_valid.json \
        --out results/ml100k/seed_ensemble_hatllm_s0_s10_valid300.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from hatllm_edge.core.data import load_dataset
from hatllm_edge.core.limits import beam_width
from hatllm_edge.core.masks import MaskKind
from hatllm_edge.core.metrics import mean_metrics, paired_bootstrap
from hatllm_edge.ranking.loo import rank_split, ranker_fusion, split_examples
from hatllm_edge.ranking.ranker import Ranker
from hatllm_edge.ranking.scoring import log_softmax


def combine_product(logprobs: list[np.ndarray]) -> np.ndarray:
    return np.mean(logprobs, axis=0)


def combine_mixture(logprobs: list[np.ndarray]) -> np.ndarray:
    return np.logaddexp.reduce(np.stack(logprobs), axis=0) - np.log(len(logprobs))


COMBINE = {"product": combine_product, "mixture": combine_mixture}


class EnsembleBackend:
    """The members' steps run one after the other on their own caches; log-probabilities combined."""

    def __init__(self, members: list[Any], combine: str = "product") -> None:
        self.members = members
        self.combine = COMBINE[combine]
        self.pass_tokens = min(m.pass_tokens for m in members)
        self.label = f"ensemble-{combine}(" + ",".join(m.label for m in members) + ")"

    @property
    def runs(self) -> int:
        return sum(m.runs for m in self.members)

    @property
    def exact_layout(self) -> bool:
        return any(m.exact_layout for m in self.members)

    def forward(self, input_ids: np.ndarray, position_ids: np.ndarray, masks: dict[MaskKind, np.ndarray], cache: Any | None,
                last_only: bool = False, rows: np.ndarray | None = None) -> tuple[np.ndarray, Any]:
        outs = [m.forward(input_ids, position_ids, masks, c, last_only, rows)
                for m, c in zip(self.members, cache or [None] * len(self.members))]
        return self.combine([log_softmax(logits) for logits, _ in outs]).astype(np.float32), [c for _, c in outs]

    def token_logprobs(self, input_ids: np.ndarray, position_ids: np.ndarray, masks: dict[MaskKind, np.ndarray], cache: Any | None,
                       targets: np.ndarray, rows: np.ndarray | None = None) -> tuple[np.ndarray, Any]:
        outs = [m.token_logprobs(input_ids, position_ids, masks, c, targets, rows)
                for m, c in zip(self.members, cache or [None] * len(self.members))]
        return self.combine([lp for lp, _ in outs]).astype(np.float32), [c for _, c in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", type=Path, nargs="+", help="int4 bundles of one recipe (same prompt, schedule and catalog)")
    ap.add_argument("--split", default="valid", choices=["valid", "test"])
    ap.add_argument("--users", type=int, default=300, help="a seeded sample of this many users (0: all)")
    ap.add_argument("--alone", type=Path, nargs="*", default=[], help="each member's full evaluation (evaluate --out), same split")
    ap.add_argument("--combine", choices=sorted(COMBINE), default="product",
                    help="product: the mean of the members' log-probabilities; mixture: the log of their mean probability")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rankers = [Ranker.from_bundle(b, "cpu", args.threads) for b in args.bundles]
    first = rankers[0]
    for b, r in zip(args.bundles[1:], rankers[1:]):
        if r.catalog.item_ids != first.catalog.item_ids or r.meta.prompt != first.meta.prompt or r.meta.schedule != first.meta.schedule:
            raise SystemExit(f"{b}: another catalog, prompt or mask schedule than {args.bundles[0]}; ensemble one recipe's seeds")
    data = load_dataset("ml-100k", None, None)
    examples = split_examples(data, args.split, args.users or None, True, 0)
    result = rank_split(EnsembleBackend([r.backend for r in rankers], args.combine), first.prompts, data, args.split, 10, beam_width(10, None),
                        examples=examples, fusion=ranker_fusion(first, assist=False, renormalise=True))
    users = sorted(result["ranks"])
    out: dict[str, Any] = {"bundles": [str(b) for b in args.bundles], "combine": args.combine, "split": args.split, "users": len(users),
                           "users_sample": {"seed": 0} if args.users else None, "ensemble": result["metrics"],
                           "s_per_user": result["s_per_user"], "peak_rss_mib": result["peak_rss_mib"], "alone": {}}
    ens = [result["ranks"][u] for u in users]
    for path in args.alone:
        ranks = json.loads(path.read_text())["ranks"]
        mine = [ranks[u] for u in users]
        out["alone"][str(path)] = {"metrics": mean_metrics(mine),
                                   "ensemble_minus_alone": {m: paired_bootstrap(mine, ens, m) for m in ("NDCG@10", "HR@10")}}
    out["ranks"] = result["ranks"]
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"ensemble of {len(rankers)}: NDCG@10 {out['ensemble']['NDCG@10']:.4f} HR@10 {out['ensemble']['HR@10']:.4f} ({len(users)} users)")
    for path, row in out["alone"].items():
        b = row["ensemble_minus_alone"]["NDCG@10"]
        print(f"  minus {Path(path).stem}: NDCG@10 {row['metrics']['NDCG@10']:.4f} -> {b['diff']:+.4f} [{b['ci_low']:+.4f}, {b['ci_high']:+.4f}]")


if __name__ == "__main__":
    main()
