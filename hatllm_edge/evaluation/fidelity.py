"""How closely one model's candidate scores follow a reference's (a quantised engine vs fp32):
per user, Kendall's tau-b between the two score lists over the same candidates."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from hatllm_edge.core.data import Dataset, Split, candidate_set
from hatllm_edge.ranking.ranker import Ranker


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b of two score vectors (``scipy.stats.kendalltau``: ties handled); 1.0 =
    same order, and 1.0 where it is undefined (a constant vector has no order to disagree with)."""
    from scipy.stats import kendalltau

    tau = kendalltau(a, b).statistic
    return 1.0 if np.isnan(tau) else float(tau)


@dataclass(frozen=True)
class FidelityConfig:
    split: Split = "test"
    users: int = 50
    candidates: int = 100
    seed: int = 0
    renormalise: bool | None = None  # None: the reference's decoding; both sides always score alike


def candidate_fidelity(reference: Ranker, other: Ranker, data: Dataset, cfg: FidelityConfig, progress: bool = True) -> dict[str, Any]:
    """Score the same seeded candidate sets (the target plus random catalog items) for a
    seeded sample of users on both rankers, with one decoding for both (raw or trie-renormalised
    steps: the reference's unless ``cfg`` says); mean and spread of Kendall's tau, top-1 agreement."""
    renormalise = reference.scoring(False, renormalise=cfg.renormalise)[0]
    rng = random.Random(cfg.seed)
    examples = data.split(cfg.split, reference.prompts.max_history)
    examples = rng.sample(examples, min(cfg.users, len(examples)))
    taus, top1 = [], []
    for ex in tqdm(examples, desc="fidelity", disable=not progress, unit="user"):
        candidates = candidate_set(len(data.catalog), data.catalog.index(ex.target), cfg.candidates, rng)
        history = [data.catalog.index(i) for i in ex.history]
        # the LLM alone: a fused assistant would add the same bonus to both and flatter the tau
        ref = reference.score(history, candidates, assist=False, renormalise=renormalise)
        got = other.score(history, candidates, assist=False, renormalise=renormalise)
        taus.append(kendall_tau(ref.by_position(), got.by_position()))
        top1.append(ref.items[0] == got.items[0])
    tau = np.asarray(taus)
    return {
        "users": len(examples),
        "candidates": cfg.candidates,
        "split": cfg.split,
        "seed": cfg.seed,
        "renormalise": renormalise,
        "kendall_tau_mean": float(tau.mean()),
        "kendall_tau_min": float(tau.min()),
        "kendall_tau_p10": float(np.percentile(tau, 10)),
        "top1_agreement": float(np.mean(top1)),
    }
