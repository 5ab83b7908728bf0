"""Top-K metrics for one target per user, and a paired bootstrap for model comparisons."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hatllm_edge.core.errors import InputError

CUTOFFS = (1, 5, 10)


def target_rank(ranked: Sequence[str], target: str) -> int | None:
    """0-based position of ``target`` in ``ranked``, None when absent."""
    for i, item in enumerate(ranked):
        if item == target:
            return i
    return None


def user_metrics(rank: int | None) -> dict[str, float]:
    """HR@1/5/10 and NDCG@5/10 of one user whose target sits at ``rank`` (0-based)."""
    out = {}
    for k in CUTOFFS:
        hit = rank is not None and rank < k
        out[f"HR@{k}"] = float(hit)
        if k > 1:
            out[f"NDCG@{k}"] = 1.0 / math.log2(rank + 2) if hit else 0.0
    return out


def mean_metrics(ranks: Sequence[int | None]) -> dict[str, float]:
    """Mean of :func:`user_metrics` over users."""
    rows = [user_metrics(r) for r in ranks]
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]} if rows else {}


def paired_bootstrap(
    ranks_a: Sequence[int | None], ranks_b: Sequence[int | None], metric: str = "NDCG@10", samples: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Difference b - a of ``metric`` with a 95% interval from resampling users (paired)."""
    a = np.array([user_metrics(r)[metric] for r in ranks_a])
    b = np.array([user_metrics(r)[metric] for r in ranks_b])
    out = bootstrap_difference(a, b, samples, seed)  # refuses runs of different lengths
    return {"metric_a": out["a"], "metric_b": out["b"], **{k: out[k] for k in ("diff", "ci_low", "ci_high", "p_b_better")}}


def bootstrap_difference(
    a: np.ndarray, b: np.ndarray, samples: int = 2000, seed: int = 0, resample_seeds: bool = False
) -> dict[str, float]:
    """Difference b - a of per-user values with a 95% interval, paired over users.

    ``a`` and ``b`` are [users] or [training seeds, users] (the same users in the same order,
    each arm with its own seeds). An arm's figure is its mean over seeds and users. Users are
    resampled (the same draw for both arms); with ``resample_seeds`` each arm's seeds are
    resampled too, so the interval carries seed-to-seed variance as well as the users' (a
    two-level bootstrap: with few seeds it is coarse, but a pooled user bootstrap alone
    reads two lucky seeds as a sure difference)."""
    a, b = np.atleast_2d(np.asarray(a, dtype=float)), np.atleast_2d(np.asarray(b, dtype=float))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"paired bootstrap needs the same users in both runs ({a.shape[1]} vs {b.shape[1]})")
    rng = np.random.default_rng(seed)
    users = rng.integers(0, a.shape[1], size=(samples, a.shape[1]))
    per_seed_a, per_seed_b = a[:, users].mean(-1), b[:, users].mean(-1)  # [seeds, samples]

    def arm_mean(per_seed: np.ndarray) -> np.ndarray:
        if not resample_seeds:
            return per_seed.mean(0)
        picks = rng.integers(0, per_seed.shape[0], size=(samples, per_seed.shape[0]))
        return per_seed[picks, np.arange(samples)[:, None]].mean(1)

    diffs = arm_mean(per_seed_b) - arm_mean(per_seed_a)
    return {"a": float(a.mean()), "b": float(b.mean()), "diff": float(b.mean() - a.mean()),
            "ci_low": float(np.percentile(diffs, 2.5)), "ci_high": float(np.percentile(diffs, 97.5)),
            "p_b_better": float((diffs > 0).mean()), "users": a.shape[1], "seeds": [a.shape[0], b.shape[0]]}


def _grid_label(row: dict[str, Any]) -> str:
    """A fuse grid row's setting: its weight, and its shortlist, mixture or raw beams where not the default."""
    label = f"{'share' if row.get('mixture') else 'w'}={float(row['assistant_weight']):g}"  # a mixture's weight is a share
    label += f",shortlist={row['shortlist']}" if row.get("shortlist") else ""
    return label + ("" if row.get("renormalise", True) else ",raw")


def load_runs(spec: str | Path) -> list[tuple[str, dict[str, int | None], dict[str, float]]]:
    """(label, per-user ranks, metrics) of an evaluation JSON, or of each row of a decoding grid
    (``fuse --out``), labelled ``FILE@w=32`` (``,shortlist=50``, ``,raw`` where set; a mixture ``FILE@share=0.9,shortlist=10``); a path with
    such a label keeps that row alone."""
    text = str(spec)
    path, _, pick = (text, "", "") if Path(text).is_file() or "@" not in text else text.rpartition("@")
    try:
        run = json.loads(Path(path).read_text(encoding="utf-8"))
        grid = "grid" in run
        # metrics from the ranks themselves: what the bootstrap reads, whatever metrics a file lists
        rows = ([(_grid_label(r), r["ranks"], mean_metrics(list(r["ranks"].values()))) for r in run["grid"]] if grid
                else [(Path(path).stem, run["ranks"], mean_metrics(list(run["ranks"].values())))])
    except (OSError, ValueError, KeyError, TypeError) as e:  # ValueError: bad JSON, or a weight that is no number
        raise InputError(f"{path}: not an evaluation JSON written by 'evaluate --out', 'popularity --out' "
                         f"or 'fuse --out' ({e})") from None
    if not grid:
        if pick:
            raise InputError(f"{text}: {path} is not a fuse grid; '@{pick}' picks a row of 'fuse --out' files only")
        return rows
    kept = [(f"{Path(path).stem}@{label}", ranks, m) for label, ranks, m in rows if not pick or label == pick]
    if not kept:
        raise InputError(f"{text}: no grid row is {pick!r}; its rows: {', '.join(label for label, _, _ in rows)}")
    return kept


def compare_runs(paths: Sequence[str | Path], samples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """A metrics table of evaluation JSONs (first = baseline; a decoding grid adds a run per row,
    see :func:`load_runs`) and, for each later run, the paired bootstrap of NDCG@10 and HR@10
    against the baseline over the same users. Compared runs of one name are numbered (#2, #3)."""
    loaded = [load_runs(path) for path in paths]
    if len(loaded[0]) != 1:
        raise InputError(f"{paths[0]}: the baseline must be one run; pick a row: "
                         + ", ".join(f"{paths[0]}@{name.rsplit('@', 1)[1]}" for name, _, _ in loaded[0]))
    runs = [loaded[0][0]]
    seen: dict[str, int] = {}
    for name, ranks, m in (run for group in loaded[1:] for run in group):  # the bootstrap's keys
        seen[name] = seen.get(name, 0) + 1
        runs.append((name if seen[name] == 1 else f"{name}#{seen[name]}", ranks, m))
    base_name, base_ranks, _ = runs[0]
    keys = list(runs[0][2])
    width = max(40, *(len(name) for name, _, _ in runs))
    lines = [f"{'run':<{width}}" + "".join(f"{k:>9}" for k in keys)]
    lines += [f"{name:<{width}}" + "".join(f"{m[k]:>9.4f}" for k in keys) for name, _, m in runs]
    boot = {}
    for name, ranks, _ in runs[1:]:
        if set(ranks) != set(base_ranks):
            raise InputError(f"{name}: evaluated other users than {base_name}; compare runs of the same split and users")
        users = sorted(base_ranks)
        a, b = [base_ranks[u] for u in users], [ranks[u] for u in users]
        boot[name] = {m: paired_bootstrap(a, b, m, samples, seed) for m in ("NDCG@10", "HR@10")}
    return {"table": "\n".join(lines), "bootstrap": boot}
