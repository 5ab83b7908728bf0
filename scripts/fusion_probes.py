"""Two more ways to make the LLM add to SASRec, read from files already measured (no model
pass but SASRec's): whom does the LLM get right that SASRec misses, and can a fusion find them?

- ``gate``: a confidence cascade. Use the fused list only for users whose SASRec distribution
  is uncertain (entropy at or above a threshold), SASRec's own list elsewhere; this would also
  skip the LLM for the confident users. The threshold is chosen on validation among the
  entropy quartiles, then read once on test.
- ``learned``: a learned fusion over SASRec's shortlist (learning to rank): a softmax over the
  shortlist of a linear score of five features (LLM score and SASRec log-probability, each
  relative to the user's best, their log-ranks, the item's log popularity rank), fitted by
  maximum likelihood of the target; 5-fold cross-validation over the validation users.

Both use rank's protocol (the user's history left out).

    python scripts/fusion_probes.py BUNDLE --out results/ml100k/fusion_probes.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from hatllm_edge.core.data import Dataset, load_dataset
from hatllm_edge.core.metrics import paired_bootstrap
from hatllm_edge.ranking.loo import split_examples
from hatllm_edge.ranking.ranker import Ranker

RESULTS = Path("results")
SHORTLIST = 50


def ranks(path: Path) -> dict[str, int | None]:
    return json.loads(path.read_text(encoding="utf-8"))["ranks"]


def entropies(ranker: Ranker, data: Dataset, split: str, users: set[str]) -> dict[str, float]:
    """SASRec's next-item entropy (nats) per user, from the whole history as rank gives it."""
    examples = [ex for ex in split_examples(data, split, None, False, 0) if str(ex.user_id) in users]
    logp = ranker.assistant.logprobs([list(ex.history) for ex in examples])
    return {str(ex.user_id): float(-(np.exp(p) * p).sum()) for ex, p in zip(examples, logp)}


def gated(fused: dict, sasrec: dict, entropy: dict[str, float], threshold: float) -> tuple[list, list]:
    users = sorted(entropy, key=int)
    return [sasrec[u] for u in users], [fused[u] if entropy[u] >= threshold else sasrec[u] for u in users]


def complementarity(llm_file: Path, sasrec_file: Path) -> dict[str, Any]:
    """Who gets the target into the top 10: both lists, one of them; and the better of the two per user."""
    llm, sasrec = ranks(llm_file), ranks(sasrec_file)
    users = sorted(sasrec, key=int)
    top10 = {u: [r[u] if r[u] is not None and r[u] < 10 else None for r in (llm, sasrec)] for u in users}  # SASRec's are full ranks
    hit_l, hit_s = (np.array([top10[u][n] is not None for u in users]) for n in (0, 1))
    best = [min((r for r in top10[u] if r is not None), default=None) for u in users]
    out = {"files": [str(llm_file), str(sasrec_file)], "users": len(users), "both": int((hit_l & hit_s).sum()),
           "llm_only": int((hit_l & ~hit_s).sum()), "sasrec_only": int((~hit_l & hit_s).sum()),
           "better_of_two_NDCG@10": paired_bootstrap([sasrec[u] for u in users], best)["metric_b"]}
    print("test, top-10 hits:", out)
    return out


def gate(ranker: Ranker, data: Dataset, files: dict[str, tuple[Path, Path]]) -> dict[str, Any]:
    out: dict[str, Any] = {"files": {s: [str(f) for f in pair] for s, pair in files.items()}}
    (vf, vs), (tf, ts) = files["valid"], files["test"]
    fused, sasrec = ranks(vf), ranks(vs)
    ent = entropies(ranker, data, "valid", set(fused))
    table = []
    for q in (0.0, 0.25, 0.5, 0.75, 1.0):
        thr = float(np.quantile(list(ent.values()), q)) if q < 1 else float("inf")
        boot = paired_bootstrap(*gated(fused, sasrec, ent, thr))
        table.append({"quantile": q, "threshold": thr, "NDCG@10": boot["metric_b"], "minus_sasrec": boot["diff"],
                      "ci": [boot["ci_low"], boot["ci_high"]]})
        print(f"valid  fused above entropy q{q:.2f} ({thr:.3f}): {boot['metric_b']:.4f}, minus SASRec {boot['diff']:+.4f} "
              f"[{boot['ci_low']:+.4f}, {boot['ci_high']:+.4f}]")
    best = max(table, key=lambda r: r["NDCG@10"])
    fused, sasrec = ranks(tf), ranks(ts)
    ent = entropies(ranker, data, "test", set(fused))
    base, mix = gated(fused, sasrec, ent, best["threshold"])
    boot = paired_bootstrap(base, mix)
    share = float(np.mean([e >= best["threshold"] for e in ent.values()]))
    print(f"test   fused above {best['threshold']:.3f} ({share:.0%} of users): {boot['metric_b']:.4f}, minus SASRec "
          f"{boot['diff']:+.4f} [{boot['ci_low']:+.4f}, {boot['ci_high']:+.4f}]")
    out.update(valid=table, chosen=best["quantile"], test={"threshold": best["threshold"], "fused_share": share,
                                                          "NDCG@10": boot["metric_b"], "sasrec_NDCG@10": boot["metric_a"],
                                                          "minus_sasrec": boot["diff"], "ci": [boot["ci_low"], boot["ci_high"]]})
    return out


def features(scores: np.lib.npyio.NpzFile, data: Dataset, split: str) -> tuple[list[str], list[np.ndarray], list[int]]:
    """Per user: the features of SASRec's top-50 unseen items and the target's row (-1: not there)."""
    users = sorted({k.split("/")[0] for k in scores.files}, key=int)
    targets = {str(ex.user_id): ex.target for ex in split_examples(data, split, None, False, 0)}
    popularity = {iid: n for n, iid in enumerate(data.popularity())}
    ids = data.catalog.item_ids
    X, T = [], []
    for u in users:
        items, llm, prior = scores[f"{u}/items"], scores[f"{u}/llm"], scores[f"{u}/prior"]
        seen = data.seen(u, split)
        keep = [j for j in np.argsort(-prior, kind="stable") if items[j] not in seen][:SHORTLIST]
        it, l, p = items[keep], llm[keep], prior[keep]
        llm_rank = np.argsort(np.argsort(-l, kind="stable"), kind="stable")
        X.append(np.stack([l - l.max(), p - p.max(), -np.log1p(llm_rank), -np.log1p(np.arange(len(keep))),
                           -np.log1p([popularity[ids[i]] for i in it])], axis=1))
        T.append(next((n for n, i in enumerate(it) if ids[i] == targets[u]), -1))
    return users, X, T


def fit(X: list[np.ndarray], T: list[int], l2: float = 1e-2, steps: int = 300, lr: float = 0.5) -> np.ndarray:
    """Full-batch gradient descent on the shortlist softmax's negative log-likelihood, from SASRec alone."""
    w = np.array([0.0, 1.0, 0.0, 0.0, 0.0])
    rows = [(x, t) for x, t in zip(X, T) if t >= 0]
    for _ in range(steps):
        grad = l2 * w
        for x, t in rows:
            s = x @ w
            q = np.exp(s - s.max())
            grad -= (x[t] - (q / q.sum()) @ x) / len(rows)
        w -= lr * grad
    return w


def rank_of(x: np.ndarray, t: int, w: np.ndarray) -> int | None:
    if t < 0:
        return None
    s = x @ w
    r = int((s > s[t]).sum())
    return r if r < 10 else None


def learned(data: Dataset, npz: Path, folds: int = 5) -> dict[str, Any]:
    users, X, T = features(np.load(npz), data, "valid")
    fold = np.random.default_rng(0).integers(0, folds, len(users))
    sasrec_only = np.array([0.0, 1.0, 0.0, 0.0, 0.0])
    base, mix, weights = [None] * len(users), [None] * len(users), []
    for k in range(folds):
        w = fit([x for x, f in zip(X, fold) if f != k], [t for t, f in zip(T, fold) if f != k])
        weights.append([round(float(v), 4) for v in w])
        for i in np.flatnonzero(fold == k):
            base[i], mix[i] = rank_of(X[i], T[i], sasrec_only), rank_of(X[i], T[i], w)
    boot = paired_bootstrap(base, mix)
    print(f"learned fusion, {folds}-fold CV on {len(users)} validation users: {boot['metric_b']:.4f}, minus SASRec "
          f"{boot['diff']:+.4f} [{boot['ci_low']:+.4f}, {boot['ci_high']:+.4f}]; weights per fold "
          "(llm, sasrec, llm log-rank, sasrec log-rank, popularity log-rank):", weights)
    return {"scores": str(npz), "users": len(users), "shortlist": SHORTLIST, "folds": folds,
            "features": ["llm - best llm", "sasrec logprob - best", "-log1p(llm rank)", "-log1p(sasrec rank)",
                         "-log1p(popularity rank)"],
            "weights": weights, "NDCG@10": boot["metric_b"], "sasrec_NDCG@10": boot["metric_a"],
            "minus_sasrec": boot["diff"], "ci": [boot["ci_low"], boot["ci_high"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path, help="the fused model's bundle (its SASRec gives the entropies)")
    ap.add_argument("--valid", nargs=2, type=Path, default=[RESULTS / "ml100k/eval_msl_r4_fused_valid300_histex_whole.json",
                                                            RESULTS / "sasrec/ml100k_valid_histex.json"],
                    metavar=("FUSED", "SASREC"), help="validation evaluations, history left out")
    ap.add_argument("--test", nargs=2, type=Path, default=[RESULTS / "ml100k/eval_hatllm_s0_fused_test_histex.json",
                                                           RESULTS / "sasrec/ml100k_test_histex.json"],
                    metavar=("FUSED", "SASREC"), help="test evaluations, history left out")
    ap.add_argument("--llm-test", type=Path, default=RESULTS / "ml100k/eval_hatllm_s0_llm_test_histex.json",
                    help="the LLM alone on test, history left out")
    ap.add_argument("--shortlist-scores", type=Path, default=RESULTS / "ml100k/shortlist_fusion_valid300.npz",
                    help="per-user LLM and SASRec scores written by scripts/shortlist_fusion.py")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    ranker, data = Ranker.from_bundle(args.bundle, threads=1), load_dataset()
    result = {"bundle": str(args.bundle), "history": "excluded",
              "complementarity": complementarity(args.llm_test, args.test[1]),
              "gate": gate(ranker, data, {"valid": tuple(args.valid), "test": tuple(args.test)}),
              "learned": learned(data, args.shortlist_scores)}
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
