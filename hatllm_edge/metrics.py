"""Top-K metrics for one target per user, and a paired bootstrap for model comparisons."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

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
    if len(ranks_a) != len(ranks_b):
        raise ValueError("paired bootstrap needs the same users in both runs")
    a = np.array([user_metrics(r)[metric] for r in ranks_a])
    b = np.array([user_metrics(r)[metric] for r in ranks_b])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(samples, len(a)))
    diffs = b[idx].mean(axis=1) - a[idx].mean(axis=1)
    return {
        "metric_a": float(a.mean()),
        "metric_b": float(b.mean()),
        "diff": float(b.mean() - a.mean()),
        "ci_low": float(np.percentile(diffs, 2.5)),
        "ci_high": float(np.percentile(diffs, 97.5)),
        "p_b_better": float((diffs > 0).mean()),
    }
