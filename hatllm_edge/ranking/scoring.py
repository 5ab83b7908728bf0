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
    is ``weight`` x log p_assistant(item).

    ``mixture``: a title scores log(s p_assistant + (1 - s) p_LLM) instead, with ``weight`` the
    assistant's share s: a mixture keeps either model's confident pick, where the product lists
    only what both support. It does not split over a title's tokens, so it scores whole titles:
    a shortlist (:func:`~hatllm_edge.ranking.search.shortlist_search`) or given candidates.
    With the history left out, the assistant's mass over it is dropped while the LLM's
    renormalised probabilities still cover those titles, so the share in effect shifts a little
    per user; ``fuse --exclude-history`` chooses the share under that same rule."""

    renormalise: bool = False
    weight: float = 0.0
    prior: np.ndarray | None = None  # [U, N] assistant log-probabilities, catalog order (None: no assistant)
    mixture: bool = False

    def rows(self, users: Sequence[int]) -> "Fusion":
        return Fusion(self.renormalise, self.weight, None if self.prior is None else self.prior[np.asarray(users)], self.mixture)

    @property
    def mixed(self) -> bool:
        """Whether titles are scored by the mixture (an assistant with a share to mix)."""
        return self.mixture and self.prior is not None and bool(self.weight)

    def title_mass(self, u: int, catalog: Catalog, exclude: Collection[int] = ()) -> dict[str, float]:
        """Per title: the log of the assistant's probability of its items (a title's leaf holds
        every item of that title, as in beam search), counting, as beam search does, only the
        items that may still be listed: ``exclude``'s (catalog indices) add no mass."""
        if self.prior is None:
            return {}
        prob = np.exp(self.prior[u])
        if exclude:
            prob[sorted(exclude)] = 0.0
        mass: dict[str, float] = {}
        for title, p in zip(catalog.titles, prob.tolist()):
            mass[title] = mass.get(title, 0.0) + p
        return {t: float(np.log(max(m, 1e-300))) for t, m in mass.items()}

    def title_bonus(self, u: int, catalog: Catalog, exclude: Collection[int] = ()) -> dict[str, float]:
        """Per title: what the assistant adds to a full title's score in the product (``weight``
        x :meth:`title_mass`); nothing for a mixture, which :meth:`mix` scores."""
        if self.prior is None or not self.weight or self.mixture:
            return {}
        return {t: self.weight * m for t, m in self.title_mass(u, catalog, exclude).items()}

    def mix(self, u: int, catalog: Catalog, titles: Sequence[str], ranked: "Ranked", exclude: Collection[int] = ()) -> "Ranked":
        """``ranked`` (the LLM's scores of ``titles``, items their positions) ranked again by the
        mixture's score, best first (ties in the given order)."""
        mass = self.title_mass(u, catalog, exclude)
        llm = ranked.by_position()
        scores = np.logaddexp(np.log(self.weight) + np.asarray([mass[t] for t in titles]), np.log1p(-self.weight) + llm)
        order = np.argsort(-scores, kind="stable")
        return Ranked([int(i) for i in order], [float(scores[i]) for i in order])


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
