"""How scripts/seed_ensemble.py combines its members' token log-probabilities."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

_spec = importlib.util.spec_from_file_location("script_seed_ensemble",
                                               Path(__file__).resolve().parents[1] / "scripts" / "seed_ensemble.py")
ensemble = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ensemble)


def test_product_and_mixture_combine_as_their_names_say() -> None:
    p = np.log(np.array([[0.7, 0.2, 0.1]], np.float32))
    q = np.log(np.array([[0.1, 0.1, 0.8]], np.float32))
    np.testing.assert_allclose(ensemble.combine_product([p, q]), (p + q) / 2, rtol=1e-6)
    np.testing.assert_allclose(np.exp(ensemble.combine_mixture([p, q])), [[0.4, 0.15, 0.45]], rtol=1e-6)
    for combine in ensemble.COMBINE.values():  # a member with itself is that member
        np.testing.assert_allclose(combine([p, p]), p, rtol=1e-6)
    # two confident members who disagree: the product picks the title both half-like, the mixture one's pick
    a = np.log(np.array([[0.72, 0.27, 0.01]], np.float32))
    b = np.log(np.array([[0.02, 0.27, 0.71]], np.float32))
    assert np.argmax(ensemble.combine_product([a, b])) == 1 and np.argmax(ensemble.combine_mixture([a, b])) == 0


def test_the_mixture_is_stable_far_out_in_the_tail() -> None:
    tiny = np.array([[-1000.0, -2000.0]], np.float32)
    np.testing.assert_allclose(ensemble.combine_mixture([tiny, tiny]), tiny, rtol=1e-6)
