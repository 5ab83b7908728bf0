"""Kendall's tau worked out by hand, and candidate fidelity on rankers whose orders are known."""

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

import numpy as np
import pytest

from hatllm_edge.core.data import load_dataset
from hatllm_edge.evaluation.fidelity import (
    FidelityConfig,
    candidate_fidelity,
    kendall_tau,
)
from hatllm_edge.ranking.scoring import Ranked


@pytest.mark.parametrize(
    ("a", "b", "want"),
    [
        ([1, 2, 3], [10, 20, 30], 1.0),
        ([1, 2, 3], [3, 2, 1], -1.0),
        ([1, 2, 3], [1, 3, 2], 1 / 3),  # pairs: (1,2) +, (1,3) +, (2,3) -
        ([1, 1, 2], [1, 2, 3], 2 / math.sqrt(2 * 3)),  # tau-b: one tie in a
    ],
)
def test_kendall_tau_by_hand(a: list[float], b: list[float], want: float) -> None:
    assert kendall_tau(np.asarray(a, float), np.asarray(b, float)) == pytest.approx(want)


class StubRanker:
    """Scores a candidate by a fixed function of its catalog index and ranks as a Ranker does:
    ``items`` are positions in the candidate list, best first."""

    def __init__(self, score_of: Callable[[int], float]) -> None:
        self.score_of = score_of
        self.prompts = SimpleNamespace(max_history=10)

    def scoring(self, assist: bool = True, weight: float | None = None, renormalise: bool | None = None) -> tuple[bool, float]:
        return bool(renormalise), 0.0

    def score(self, history: Sequence[int], candidates: Sequence[int], assist: bool = True,
              renormalise: bool | None = None) -> Ranked:
        scores = [self.score_of(c) for c in candidates]
        order = sorted(range(len(candidates)), key=lambda i: -scores[i])
        return Ranked(order, [scores[i] for i in order])


@pytest.mark.parametrize(("other", "tau", "top1"), [
    (lambda c: -2.0 * c + 7, 1.0, 1.0),  # the same order on another scale
    (lambda c: float(c), -1.0, 0.0),  # the reverse order
    (lambda c: -float({4: 5, 5: 4}.get(c, c)), 13 / 15, 1.0),  # the last two swapped: 1 of 15 pairs
    (lambda c: -float({0: 1, 1: 0}.get(c, c)), 13 / 15, 0.0),  # the first two swapped: top-1 differs
])
def test_candidate_fidelity_compares_scores_per_candidate(data_files: tuple[Path, Path], other: Callable[[int], float],
                                                          tau: float, top1: float) -> None:
    """Each model's scores are put back in candidate order before the tau: sorted lists would
    read 1.0 for any pair. Six candidates (the whole tiny catalog), so every user sees one order."""
    data = load_dataset(interactions=data_files[0], items=data_files[1])
    reference = StubRanker(lambda c: -float(c))
    result = candidate_fidelity(reference, StubRanker(other), data, FidelityConfig(split="test", users=6, candidates=6))
    assert result["users"] == 6
    assert result["kendall_tau_mean"] == pytest.approx(tau) and result["kendall_tau_min"] == pytest.approx(tau)
    assert result["top1_agreement"] == top1
