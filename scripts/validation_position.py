"""Does validation judge the LLM as test does? In ``loo-full`` the validation target comes right
after the last trained item, the test target one step later, after the validation item, which
no model trained on. In MovieLens-100K 45% of targets share their second with the item before
them (ratings entered in one sitting), so a validation target is often a sibling of the items
the model was just trained to predict. This splits each run's users by that (the target in the
same second as the item before it, or not) and compares the run with a baseline (SASRec) in
each group, with paired bootstrap intervals and the difference between the groups.

    python scripts/validation_position.py --baseline results/sasrec/ml100k_valid.json \
        results/ml100k/eval_gemma3_hatllm_r5_llm_valid.json --out results/ml100k/position_valid.json

``--without-validation FILE`` writes the interactions minus each user's validation item: its
test split asks for the real test target after the trained history alone (two steps past
training, with no untrained item between), to evaluate any model on with ``--interactions``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from hatllm_edge.core.data import (
    FROM_END,
    ML100K,
    load_dataset,
    read_events,
    recbole_ml100k_dir,
)
from hatllm_edge.core.metrics import bootstrap_difference, user_metrics

METRIC = "NDCG@10"
SAMPLES = 2000


def same_second(events: dict[str, list[tuple[float, int, str]]], split: str) -> dict[str, bool]:
    """Per user with a target: does ``split``'s target share its timestamp with the item before it?"""
    at = FROM_END[split]
    return {u: ev[-at][0] == ev[-at - 1][0] for u, ev in events.items() if len(ev) > at}


def per_user(spec: str) -> tuple[str, str, dict[str, float]]:
    """(split, history protocol, per-user NDCG@10) of an evaluation JSON, or of one setting of
    a ``scripts/shortlist_fusion.py`` result: ``FILE#PROTOCOL/FUSION/SHORTLIST/WEIGHT``
    (e.g. ``...valid.json#excluded/mix+llm/10/0.7``)."""
    path, _, setting = spec.partition("#")
    run = json.loads(Path(path).read_text())
    if setting:
        try:
            protocol, fusion, shortlist, weight = setting.split("/")
            rows = run["protocols"][protocol]["settings"]
            run = {"split": run["split"], "history": protocol,
                   "ranks": next(r["ranks"] for r in rows if (r["fusion"], r["shortlist"], r["weight"]) == (fusion, int(shortlist), float(weight)))}
        except (KeyError, ValueError, StopIteration):
            raise SystemExit(f"{spec}: no such setting (PROTOCOL/FUSION/SHORTLIST/WEIGHT of a shortlist_fusion.py result)") from None
    if "ranks" not in run or "split" not in run:
        raise SystemExit(f"{path}: not an evaluation JSON with per-user ranks (evaluate/sasrec evaluate --out)")
    # files from before the history switch ranked with the history included
    return run["split"], run.get("history") or "included", {u: user_metrics(r)[METRIC] for u, r in run["ranks"].items()}


def group_gap(run: dict[str, float], base: dict[str, float], groups: dict[str, bool]) -> dict[str, Any]:
    """Run minus baseline in each group, and how much larger that gap is where the target shares its second."""
    out: dict[str, Any] = {}
    diffs = {}
    for name, flag in (("same_second", True), ("other", False)):
        users = [u for u in run if groups[u] == flag]
        a, b = np.array([base[u] for u in users]), np.array([run[u] for u in users])
        out[name] = bootstrap_difference(a, b, SAMPLES)
        diffs[name] = b - a
    rng = np.random.default_rng(0)
    boot = [rng.choice(diffs["same_second"], len(diffs["same_second"])).mean() - rng.choice(diffs["other"], len(diffs["other"])).mean()
            for _ in range(SAMPLES)]
    gap = diffs["same_second"].mean() - diffs["other"].mean()
    out["same_second_minus_other"] = {"diff": float(gap), "ci_low": float(np.quantile(boot, 0.025)), "ci_high": float(np.quantile(boot, 0.975))}
    return out


def write_without_validation(events: dict[str, list[tuple[float, int, str]]], out: Path) -> int:
    """The interactions minus each user's validation item, in loo-full order (ties keep theirs)."""
    dropped = 0
    with out.open("w") as f:
        f.write("user_id\titem_id\ttimestamp\n")
        for user, ev in events.items():
            keep = ev[:-2] + ev[-1:] if len(ev) > 2 else ev
            dropped += len(ev) - len(keep)
            f.writelines(f"{user}\t{item}\t{ts:.0f}\n" for ts, _, item in keep)
    return dropped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", help="evaluation JSONs (the same split as the baseline), or FILE#PROTOCOL/FUSION/SHORTLIST/WEIGHT")
    ap.add_argument("--baseline", help="the reference run's evaluation JSON (SASRec)")
    ap.add_argument("--without-validation", type=Path, help="write the interactions minus each user's validation item here (tab-separated: .tsv or .inter)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    data = load_dataset()
    events = read_events(recbole_ml100k_dir() / f"{ML100K}.inter", data.catalog)
    if args.without_validation:
        if args.without_validation.suffix not in (".tsv", ".inter", ".txt"):
            raise SystemExit(f"{args.without_validation}: the file is tab-separated; name it .tsv or .inter")
        print(f"{args.without_validation}: {write_without_validation(events, args.without_validation)} validation items left out")
    if not args.runs:
        return
    if args.baseline is None:
        raise SystemExit("give --baseline with the runs")
    split, history, base = per_user(args.baseline)
    groups = same_second(events, split)
    print(f"{split}: {sum(groups.values())} of {len(groups)} targets share their second with the item before them")
    result: dict[str, Any] = {"split": split, "baseline": args.baseline, "metric": METRIC, "runs": {}}
    for spec in args.runs:
        run_split, run_history, run = per_user(spec)
        if (run_split, run_history) != (split, history) or run.keys() != base.keys():
            raise SystemExit(f"{spec}: split {run_split!r}, history {run_history}, on {len(run)} users; "
                             f"the baseline is {split!r}, history {history}, on {len(base)}")
        r = result["runs"][spec] = group_gap(run, base, groups)
        cells = [f"{g} ({r[g]['users']}) {r[g]['b']:.4f} vs {r[g]['a']:.4f}: {r[g]['diff']:+.4f} [{r[g]['ci_low']:+.4f}, {r[g]['ci_high']:+.4f}]"
                 for g in ("same_second", "other")]
        d = r["same_second_minus_other"]
        file, hash_, setting = spec.partition("#")
        print(f"{Path(file).name}{hash_}{setting}\n  " + "\n  ".join(cells) + f"\n  gap between the groups {d['diff']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
