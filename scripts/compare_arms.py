"""Two training arms (e.g. HatLLM vs a causal fine-tune), each trained with one or more seeds,
compared on the same users: per seed pair and pooled over seeds, a paired bootstrap of each
metric for every evaluation both arms have (``valid/llm``, ``test/fused``, ...).

The spec (JSON) names the arms, their rounds (a run's ``hatllm.json``, or the same fields
written inline where the run record is gone) and their evaluation JSONs (``evaluate --out``):

    {"question": "...", "baseline": "hatllm", "metrics": ["NDCG@10", "HR@10"],
     "arms": {"hatllm": {"schedule": {...}, "seeds": [{"label": "...", "rounds": [...],
                                                      "evals": {"test/llm": "results/....json"}}]},
              "causal": {...}}}

Pooled: each user's metric averaged over an arm's seeds, then the paired bootstrap over users
(seeds pair by position; an evaluation enters the pooled figure only where every seed has it).

    python scripts/compare_arms.py results/ml100k/hatllm_vs_causal_spec.json --out results/ml100k/hatllm_vs_causal.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from hatllm_edge.core.metrics import user_metrics

ROUND_FIELDS = ("seed", "examples", "lr", "loss", "init_from")


def round_record(entry: Any) -> dict[str, Any]:
    """A round as the record states it: a run's hatllm.json, or inline fields."""
    if isinstance(entry, dict):
        return entry
    meta = json.loads(Path(entry).read_text())
    summary = meta.get("train_summary", {})
    return {"record": entry, **{k: meta["train"].get(k) for k in ROUND_FIELDS},
            "steps": summary.get("steps_done"), "train_s": summary.get("train_s"), "peak_rss_mib": summary.get("peak_rss_mib")}


def per_user(path: str, metric: str) -> dict[str, float]:
    ranks = json.loads(Path(path).read_text())["ranks"]
    return {u: user_metrics(r)[metric] for u, r in ranks.items()}


def bootstrap(a: dict[str, float], b: dict[str, float], samples: int = 2000, seed: int = 0) -> dict[str, float]:
    """b - a over the users both have (they must be the same users)."""
    if set(a) != set(b):
        raise SystemExit("the two evaluations cover different users; compare runs of the same split and users")
    users = sorted(a)
    x, y = np.array([a[u] for u in users]), np.array([b[u] for u in users])
    idx = np.random.default_rng(seed).integers(0, len(users), size=(samples, len(users)))
    diffs = y[idx].mean(1) - x[idx].mean(1)
    return {"a": float(x.mean()), "b": float(y.mean()), "diff": float(y.mean() - x.mean()),
            "ci_low": float(np.percentile(diffs, 2.5)), "ci_high": float(np.percentile(diffs, 97.5)),
            "p_b_better": float((diffs > 0).mean()), "users": len(users)}


def pooled(paths: list[str], metric: str) -> dict[str, float]:
    runs = [per_user(p, metric) for p in paths]
    return {u: float(np.mean([r[u] for r in runs])) for u in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    spec = json.loads(args.spec.read_text())
    base = spec["baseline"]
    (other,) = [a for a in spec["arms"] if a != base]
    arms = {name: {**arm, "seeds": [{**s, "rounds": [round_record(r) for r in s["rounds"]]} for s in arm["seeds"]]}
            for name, arm in spec["arms"].items()}
    keys = sorted({k for s in arms[base]["seeds"] for k in s["evals"]} & {k for s in arms[other]["seeds"] for k in s["evals"]})
    comparisons: dict[str, Any] = {}
    for key in keys:
        entry: dict[str, Any] = {"per_seed": [], "pooled": None}
        pairs = list(zip(arms[base]["seeds"], arms[other]["seeds"]))
        for sa, sb in pairs:
            if key in sa["evals"] and key in sb["evals"]:
                entry["per_seed"].append({"seeds": [sa["label"], sb["label"]],
                                          **{m: bootstrap(per_user(sa["evals"][key], m), per_user(sb["evals"][key], m))
                                             for m in spec["metrics"]}})
        full = [s for s in arms[base]["seeds"] if key in s["evals"]], [s for s in arms[other]["seeds"] if key in s["evals"]]
        if len(full[0]) == len(arms[base]["seeds"]) and len(full[1]) == len(arms[other]["seeds"]):
            entry["pooled"] = {"seeds": [len(full[0]), len(full[1])],
                               **{m: bootstrap(pooled([s["evals"][key] for s in full[0]], m),
                                               pooled([s["evals"][key] for s in full[1]], m)) for m in spec["metrics"]}}
        comparisons[key] = entry
    result = {"question": spec["question"], "difference": f"{other} minus {base}", "arms": arms, "comparisons": comparisons}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for key, entry in comparisons.items():
        for row in entry["per_seed"] + ([entry["pooled"]] if entry["pooled"] else []):
            figs = "  ".join(f"{m} {row[m]['diff']:+.4f} [{row[m]['ci_low']:+.4f}, {row[m]['ci_high']:+.4f}]" for m in spec["metrics"])
            print(f"{key:<12} {str(row['seeds']):<28} {figs}")


if __name__ == "__main__":
    main()
