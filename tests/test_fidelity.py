"""Kendall's tau worked out by hand."""

import math

import numpy as np
import pytest

from hatllm_edge.evaluation.fidelity import kendall_tau


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
