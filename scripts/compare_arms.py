"""Two training arms (e.g. HatLLM vs a causal fine-tune), each trained with one or more seeds,
compared on the same users: per seed pair and pooled over seeds, a paired bootstrap of each
metric for every evaluation both arms have (``valid/llm``, ``test/fused``, ...).

The spec (JSON) names the arms, their rounds (a run's ``hatllm.json``, or the same fields
written inline where the run record is gone) and their evaluation JSONs (``evaluate --out``):

    {"question": "...", "baseline": "hatllm", "metrics": ["NDCG@10", "HR@10"],
     "arms": {"hatllm": {"schedule": {...}, "seeds": [{"label": "...", "rounds": [...],
                                                      "evals": {"test/llm": "results/....json"}}]},
              "causal": {...}}}

Per seed: the arms' seeds paired by position. Seed spread: each arm's later seeds minus its
first, the noise a difference between arms has to clear. Pooled (once every seed of both arms
has the evaluation): each arm's mean over its seeds and users, the paired bootstrap over users;
with two or more seeds per arm also with the seeds resampled, whose interval carries the
seed-to-seed variance that a bootstrap over users alone leaves out.

    python scripts/compare_arms.py results/ml100k/hatllm_vs_causal_spec.json --out results/ml100k/hatllm_vs_causal.json

``--markdown`` also prints the first metric as one Markdown table (each seed's value, then every
difference with its interval, bold where the interval excludes zero), the form docs/results.md uses.
"""

from __future__ import annotations

import argparse
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from hatllm_edge.core.metrics import bootstrap_difference, user_metrics

ROUND_FIELDS = ("seed", "examples", "lr", "loss", "init_from")


def round_record(entry: Any) -> dict[str, Any]:
    """A round as the record states it: a run's hatllm.json, or inline fields."""
    if isinstance(entry, dict):
        return entry
    meta = json.loads(Path(entry).read_text())
    summary = meta.get("train_summary", {})
    return {"record": entry, **{k: meta["train"].get(k) for k in ROUND_FIELDS},
            "steps": summary.get("steps_done"), "train_s": summary.get("train_s"), "peak_rss_mib": summary.get("peak_rss_mib")}


def seed_record(seed: dict[str, Any]) -> dict[str, Any]:
    """A seed with its rounds read from their records; one entered before its evaluations (its
    last round may still be training, its record not yet written) as the spec names it, pending."""
    if not seed["evals"]:
        return {**seed, "pending": True}
    return {**seed, "rounds": [round_record(r) for r in seed["rounds"]]}


@lru_cache(maxsize=None)
def ranks_of(path: str) -> dict[str, int | None]:
    """An evaluation's per-user ranks, read once however many comparisons use it."""
    return json.loads(Path(path).read_text())["ranks"]


def per_user(path: str, metric: str) -> dict[str, float]:
    return {u: user_metrics(r)[metric] for u, r in ranks_of(path).items()}


def compare(base: list[str], other: list[str], metric: str, resample_seeds: bool = False) -> dict[str, Any]:
    """``other`` minus ``base``: each a list of one arm's evaluation JSONs (its seeds)."""
    runs = [per_user(p, metric) for p in base + other]
    users = sorted(runs[0])
    if any(set(r) != set(users) for r in runs):
        raise SystemExit("the evaluations cover different users; compare runs of the same split and users")
    values = np.array([[r[u] for u in users] for r in runs])
    return bootstrap_difference(values[: len(base)], values[len(base):], resample_seeds=resample_seeds)


def rows(spec: dict[str, Any], arms: dict[str, Any], key: str) -> dict[str, Any]:
    """Every comparison of one evaluation (``test/llm``, ...) that the arms' seeds allow."""
    base = spec["baseline"]
    (other,) = [a for a in arms if a != base]
    metrics = spec["metrics"]
    have = {name: [s for s in arm["seeds"] if key in s["evals"]] for name, arm in arms.items()}

    def row(seeds: list[Any], a: list[dict], b: list[dict], resample: bool = False) -> dict[str, Any]:
        return {"seeds": seeds, **{m: compare([s["evals"][key] for s in a], [s["evals"][key] for s in b], m, resample)
                                   for m in metrics}}

    entry: dict[str, Any] = {
        "per_seed": [row([sa["label"], sb["label"]], [sa], [sb]) for sa, sb in zip(have[base], have[other])],
        # how far two seeds of one arm lie apart: the noise any difference between arms has to clear
        "seed_spread": {name: [row([seeds[0]["label"], s["label"]], [seeds[0]], [s]) for s in seeds[1:]]
                        for name, seeds in have.items() if len(seeds) > 1},
        "pooled": None, "pooled_seeds_resampled": None}
    if all(len(have[n]) == len(arms[n]["seeds"]) for n in arms):  # every seed of both arms evaluated
        counts = [len(have[base]), len(have[other])]
        entry["pooled"] = row(counts, have[base], have[other])
        if min(counts) > 1:
            entry["pooled_seeds_resampled"] = row(counts, have[base], have[other], resample=True)
    return entry


# how the table names the usual evaluations; any other key is shown as it is
READINGS = {"valid/llm": "validation, the LLM alone", "test/llm": "test, the LLM alone",
            "test/llm_histex": "test, the LLM alone, history left out", "test/fused": "test, fused, history kept",
            "test/fused_histex": "test, fused, history left out"}


def cell(row: dict[str, Any] | None, metric: str) -> str:
    """A difference and its interval, bold where the interval excludes zero."""
    if row is None:
        return ""
    r = row[metric]
    text = f"{r['diff']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
    return f"**{text}**" if r["ci_low"] > 0 or r["ci_high"] < 0 else text


def markdown(result: dict[str, Any], base: str, other: str, metric: str) -> str:
    """One evaluation per line (the usual readings first): each seed's ``metric``, the per-seed
    and pooled differences, the seed spreads; a legend below names the seeds."""
    arms = result["arms"]
    seeds = [(name, i, s) for name, arm in arms.items() for i, s in enumerate(arm["seeds"])]
    pairs = min(len(arms[base]["seeds"]), len(arms[other]["seeds"]))
    spreads = [(name, i) for name, arm in arms.items() for i in range(1, len(arm["seeds"]))]
    head = ([f"{name} #{i}" for name, i, _ in seeds] + [f"{other} minus {base}, #{i}" for i in range(pairs)]
            + ["pooled", "pooled, seeds resampled"] + [f"{name} #{i} minus #0" for name, i in spreads])
    lines = [f"| {metric} | " + " | ".join(head) + " |", "| --- " * (len(head) + 1) + "|"]
    order = sorted(result["comparisons"], key=lambda k: (list(READINGS).index(k) if k in READINGS else len(READINGS), k))
    for key in order:
        entry = result["comparisons"][key]
        values = [f"{np.mean(list(per_user(s['evals'][key], metric).values())):.4f}" if key in s["evals"] else ""
                  for _, _, s in seeds]
        per_seed = [cell(r, metric) for r in entry["per_seed"]] + [""] * (pairs - len(entry["per_seed"]))
        spread = {(name, i + 1): r for name, rs in entry["seed_spread"].items() for i, r in enumerate(rs)}
        cells = (values + per_seed + [cell(entry["pooled"], metric), cell(entry["pooled_seeds_resampled"], metric)]
                 + [cell(spread.get(k), metric) for k in spreads])
        lines.append(f"| {READINGS.get(key, key)} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"{name} #{i}: {s['label']}" + (" (pending)" if s.get("pending") else "") for name, i, s in seeds]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--markdown", action="store_true", help="also print the first metric as a Markdown table")
    args = ap.parse_args()
    spec = json.loads(args.spec.read_text())
    base = spec["baseline"]
    (other,) = [a for a in spec["arms"] if a != base]
    arms = {name: {**arm, "seeds": [seed_record(s) for s in arm["seeds"]]} for name, arm in spec["arms"].items()}
    keys = sorted({k for s in arms[base]["seeds"] for k in s["evals"]} & {k for s in arms[other]["seeds"] for k in s["evals"]})
    comparisons = {key: rows(spec, arms, key) for key in keys}
    result = {"question": spec["question"], "difference": f"{other} minus {base}; seed_spread: a later seed minus the first",
              "arms": arms, "comparisons": comparisons}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for key, entry in comparisons.items():
        printed = [("", r) for r in entry["per_seed"]]
        printed += [(f"{name} spread ", r) for name, rs in entry["seed_spread"].items() for r in rs]
        printed += [("pooled ", entry["pooled"])] if entry["pooled"] else []
        printed += [("pooled, seeds resampled ", entry["pooled_seeds_resampled"])] if entry["pooled_seeds_resampled"] else []
        for tag, row in printed:
            figs = "  ".join(f"{m} {row[m]['diff']:+.4f} [{row[m]['ci_low']:+.4f}, {row[m]['ci_high']:+.4f}]" for m in spec["metrics"])
            print(f"{key:<18} {tag + str(row['seeds']):<60} {figs}")
    if args.markdown:
        print("\n" + markdown(result, base, other, spec["metrics"][0]))


if __name__ == "__main__":
    main()
