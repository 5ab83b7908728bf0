"""Bounds on every size a ranking request controls, in one place (README "Commands").

A request that goes past one is refused with a message naming the field, the value and the
limit (exit code 2), before any model is loaded where the model is not needed to tell.
"""

from __future__ import annotations

MAX_K = 100  # items in one ranked list; the beam search runs max(beams, k) wide
DEFAULT_K = 10
DEFAULT_BEAMS = 10  # beam width when none is asked for: the README's figures use 10
MAX_BEAMS = 100  # memory grows with the width (one KV cache row per beam)
MAX_HISTORY = 10_000  # history entries kept from a request, the most recent (the model reads its last max_history;
# the rest still counts as seen when the history is left out of the list)
MAX_CANDIDATES = 2_000  # candidates in one request (and never more than the catalog holds)
MAX_REF_CHARS = 512  # characters in one item id or title (the longest ML-100K title has 81)
MAX_REQUEST_BYTES = 16 * 1024 * 1024  # a user.json file


def beam_width(k: int, beams: int | None = None) -> int:
    """The width the beam search runs at: ``beams`` (default :data:`DEFAULT_BEAMS`), never
    narrower than ``k``, so a longer list is never searched with fewer hypotheses than it holds."""
    return max(beams or DEFAULT_BEAMS, k)
