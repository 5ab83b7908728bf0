"""Fusion after retrieval instead of inside the beam: the assistant (SASRec) shortlists its
top-K items, the LLM scores each exactly (candidate scoring, renormalised as the model's
beams are), and the two are combined per item. The LLM's scores do not depend on the
combination, so every setting is read from one scoring pass (saved beside the results as
.npz; ``--scores`` reads it again); SASRec alone (the shortlist's own order) is the baseline on
the same users, with a paired bootstrap.

Three ways to combine: ``sum`` (LLM + w x SASRec log-probabilities: a product of experts,
which lists what both support), ``mix`` (log(s x p_SASRec + (1 - s) x p_LLM): a mixture with
the assistant's share s, which keeps either model's confident pick; both are probabilities
over the catalog's titles, the LLM's renormalised over the title tree) and ``rrf``.

    python scripts/shortlist_fusion.py MODEL_BUNDLE --split valid --users 300 --shortlist 50 \
        --out results/ml100k/shortlist_fusion_valid300.json
    python scripts/shortlist_fusion.py --scores results/ml100k/shortlist_fusion_valid300.npz \
        --out results/ml100k/shortlist_fusion_valid300.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from hatllm_edge.core.data import Dataset, load_dataset
from hatllm_edge.core.metrics import paired_bootstrap, target_rank
from hatllm_edge.ranking.loo import split_examples
from hatllm_edge.ranking.ranker import Ranker

RRF_K = 60  # the constant of Cormack et al. (2009)
SAVED = ("items", "llm", "prior", "beam_included", "beam_excluded")  # per user, in the .npz


def score_shortlists(ranker: Ranker, data: Dataset, split: str, users: int, size: int, batch: int,
                     llm_beam: int = 0) -> list[dict[str, Any]]:
    """Per user: the assistant's log-probabilities and the LLM's score of every item in the
    union of its two shortlists (history kept, history left out); with ``llm_beam``, also of
    the LLM's own top ``llm_beam`` (its beam search alone, under either protocol), listed per
    protocol, so that a fusion can reach an item the LLM is sure of and SASRec is not."""
    if ranker.assistant is None:
        raise SystemExit("the bundle has no assistant (sasrec.json + sasrec.onnx): export a fused model")
    examples = split_examples(data, split, users or None, True, 0)
    rows = []
    for i in tqdm(range(0, len(examples), batch), desc="score shortlists", unit="batch"):
        chunk = examples[i : i + batch]
        prior = ranker.assistant.logprobs([list(ex.history) for ex in chunk])
        shortlists = []
        for ex, p in zip(chunk, prior):
            seen = data.seen(ex.user_id, split)
            order = [int(j) for j in np.argsort(-p, kind="stable")]
            shortlists.append(sorted(set(order[:size]) | set([j for j in order if j not in seen][:size])))
        histories = [[ranker.catalog.index(j) for j in ex.history] for ex in chunk]
        beams = {protocol: [r.items for r in ranker.top_k(histories, llm_beam, assist=False, exclude_history=protocol == "excluded")]
                 if llm_beam else [[] for _ in chunk] for protocol in ("included", "excluded")}
        shortlists = [sorted(set(s) | set(beams["included"][u]) | set(beams["excluded"][u])) for u, s in enumerate(shortlists)]
        for u, (ex, p, items, ranked) in enumerate(zip(chunk, prior, shortlists, ranker.score_batch(histories, shortlists, assist=False))):
            rows.append({"user": ex.user_id, "target": ex.target, "seen": sorted(data.seen(ex.user_id, split)),
                         "items": items, "llm": ranked.by_position(), "prior": p[items],
                         **{f"beam_{protocol}": np.asarray([items.index(j) for j in beams[protocol][u]], dtype=np.int64)
                            for protocol in beams}})
    return rows


def load_scores(path: Path, data: Dataset) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows of an earlier scoring pass (its .npz) and that pass's header (the .json beside it):
    every fusion is read again without a model pass."""
    head = json.loads(path.with_suffix(".json").read_text())
    split = head["split"]
    targets = {ex.user_id: ex.target for ex in data.split(split)}
    saved = np.load(path)
    users = list(dict.fromkeys(name.split("/")[0] for name in saved.files))  # the pass's user order
    rows = [{"user": u, "target": targets[u], "seen": sorted(data.seen(u, split)),
             **{key: saved[f"{u}/{key}"] for key in SAVED if f"{u}/{key}" in saved.files}} for u in users]
    return rows, {k: head[k] for k in ("bundle", "backend", "split", "renormalise", "s_per_user_largest")}


def fused_ranks(rows: list[dict[str, Any]], data: Dataset, size: int, excluded: bool, how: str, w: float) -> list[int | None]:
    """Each user's target rank in the fused shortlist (None: not in the top 10)."""
    ranks = []
    for row in rows:
        order = np.argsort(-row["prior"], kind="stable")
        seen = set(row["seen"]) if excluded else set()
        keep = [j for j in order if row["items"][j] not in seen][:size]
        if how == "mix+llm":  # the LLM's own top items join the shortlist (its beam already left out the history)
            keep += [int(j) for j in row[f"beam_{'excluded' if excluded else 'included'}"] if j not in keep]
        prior, llm = row["prior"][keep], row["llm"][keep]
        if how == "sasrec":
            score = prior
        elif how == "sum":
            score = llm + w * prior
        elif how in ("mix", "mix+llm"):
            score = np.logaddexp(np.log(w) + prior, np.log1p(-w) + llm)
        else:  # reciprocal-rank fusion: 1/(60 + rank) from each, the LLM's weighted by w
            llm_rank = np.argsort(np.argsort(-llm, kind="stable"), kind="stable")
            score = w / (RRF_K + llm_rank) + 1.0 / (RRF_K + np.arange(len(keep)))
        top = [data.catalog.item_ids[row["items"][keep[j]]] for j in np.argsort(-score, kind="stable")[:10]]
        ranks.append(target_rank(top, row["target"]))
    return ranks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path, nargs="?", help="an exported bundle with its assistant")
    ap.add_argument("--scores", type=Path, help="an earlier pass's .npz: read its scores again instead of scoring")
    ap.add_argument("--split", default="valid", choices=("valid", "test"))
    ap.add_argument("--users", type=int, default=300, help="a seeded sample (seed 0, as fuse draws it); 0 = all")
    ap.add_argument("--shortlist", default="10,20,30,50", help="shortlist sizes; the LLM scores the largest once")
    ap.add_argument("--weights", default="0,1,2,4,8,16,32")
    ap.add_argument("--rrf-weights", default="0.25,0.5,1")
    ap.add_argument("--mix-shares", default="0.5,0.7,0.8,0.9,0.95", help="the assistant's share in the mixture, each in (0, 1)")
    ap.add_argument("--llm-beam", type=int, default=0, help="also score the LLM's own top N (its beam search, either protocol) "
                    "and fuse by mixture over the shortlist and them ('mix+llm')")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch-users", type=int, default=4)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    settings = ([("sum", float(w)) for w in args.weights.split(",")] + [("rrf", float(w)) for w in args.rrf_weights.split(",")]
                + [("mix", float(w)) for w in args.mix_shares.split(",")])
    if any(how == "mix" and not 0 < w < 1 for how, w in settings):
        raise SystemExit(f"--mix-shares {args.mix_shares}: each share must lie strictly between 0 and 1")
    if (args.bundle is None) == (args.scores is None):
        raise SystemExit("give a bundle to score, or --scores with an earlier pass's .npz")
    data = load_dataset()
    sizes = sorted(int(n) for n in args.shortlist.split(","))
    if args.scores:
        rows, head = load_scores(args.scores, data)
        head["scores"] = str(args.scores)
    else:
        ranker = Ranker.from_bundle(args.bundle, threads=args.threads)
        start = time.time()
        rows = score_shortlists(ranker, data, args.split, args.users, sizes[-1], args.batch_users, args.llm_beam)
        head = {"bundle": str(args.bundle), "backend": ranker.label, "split": args.split,
                "renormalise": ranker.decoding.renormalise, "llm_beam": args.llm_beam, "s_per_user_largest": round((time.time() - start) / len(rows), 3)}
    if "beam_included" in rows[0]:  # scored with the LLM's own lists (--llm-beam), now or in the pass re-read
        settings += [("mix+llm", w) for how, w in settings if how == "mix"]
    result: dict[str, Any] = {**head, "users": len(rows), "shortlists": sizes, "protocols": {}}
    for excluded in (False, True):
        base = fused_ranks(rows, data, sizes[-1], excluded, "sasrec", 0.0)
        table = []
        for size in sizes:
            for how, w in settings:
                ranks = fused_ranks(rows, data, size, excluded, how, w)
                boot = paired_bootstrap(base, ranks)
                table.append({"shortlist": size, "fusion": how, "weight": w, "NDCG@10": boot["metric_b"],
                              "minus_sasrec": boot["diff"], "ci": [boot["ci_low"], boot["ci_high"]],
                              "ranks": dict(zip((r["user"] for r in rows), ranks))})
                print(f"{'excluded' if excluded else 'included'} K={size:<3} {how:<4} w={w:<5} NDCG@10 {boot['metric_b']:.4f}  "
                      f"minus SASRec {boot['diff']:+.4f} [{boot['ci_low']:+.4f}, {boot['ci_high']:+.4f}]")
        result["protocols"]["excluded" if excluded else "included"] = {"sasrec_NDCG@10": boot["metric_a"], "settings": table}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.scores is None:
        np.savez_compressed(args.out.with_suffix(".npz"), **{f"{r['user']}/{key}": np.asarray(r[key])
                                                             for r in rows for key in SAVED if key in r})


if __name__ == "__main__":
    main()
