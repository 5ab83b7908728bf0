"""How a step's next tokens are scored (the LLM's log-probabilities, with the assistant's
fused share) and what a ranking returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Sequence

import numpy as np

from hatllm_edge.core.data import Catalog


@dataclass(frozen=True)
class Fusion:
    """How a step's score is made: the LLM's token log-probability, renormalised over the trie
    node's children (``renormalise``: the probabilities of all catalog titles then sum to 1),
    plus ``weight`` x the log of the assistant's probability mass under the child, divided by
    the mass under its parent (D3's text-free assistant): summed over a title, the second term
    is ``weight`` x log p_assistant(item)."""

    renormalise: bool = False
    weight: float = 0.0
    prior: np.ndarray | None = None  # [U, N] assistant log-probabilities, catalog order (None: no assistant)

    def rows(self, users: Sequence[int]) -> "Fusion":
        return Fusion(self.renormalise, self.weight, None if self.prior is None else self.prior[np.asarray(users)])

    def title_bonus(self, u: int, catalog: Catalog, exclude: Collection[int] = ()) -> dict[str, float]:
        """Per title: what the assistant adds to a full title's score (its leaf holds every
        item of that title, as in beam search), counting, as beam search does, only the items
        that may still be listed: ``exclude``'s (catalog indices) add no mass."""
        if self.prior is None or not self.weight:
            return {}
        prob = np.exp(self.prior[u])
        if exclude:
            prob[sorted(exclude)] = 0.0
        mass: dict[str, float] = {}
        for title, p in zip(catalog.titles, prob.tolist()):
            mass[title] = mass.get(title, 0.0) + p
        return {t: self.weight * float(np.log(max(m, 1e-300))) for t, m in mass.items()}


@dataclass(frozen=True)
class Ranked:
    """A ranked list, best first, and its scores (log-probabilities): ``items`` are catalog
    indices for a full-catalog list, positions in the candidate list for scored candidates."""

    items: list[int]
    scores: list[float]

    def by_position(self) -> np.ndarray:
        """Scored candidates' scores back in the order the candidates were given: what comparing
        two models (or two layouts) candidate by candidate needs."""
        scores = np.empty(len(self.items))
        scores[self.items] = self.scores
        return scores


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def logsumexp(x: np.ndarray) -> float:
    top = float(x.max())
    if not np.isfinite(top):  # every entry -inf (or one +inf): the answer is top itself, not NaN
        return top
    return top + float(np.log(np.exp(x - top).sum()))
