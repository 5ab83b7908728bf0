"""Prompts run in batches of one padded width, and the prefilled cache that beam search and
candidate scoring start from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from hatllm_edge.core.masks import (
    build_masks,
    causal_visibility,
    left_padded,
    padded_positions,
)
from hatllm_edge.core.prompt import Encoded
from hatllm_edge.engine.backend import Backend
from hatllm_edge.ranking.scoring import log_softmax

PROMPT_BUCKET = 16  # prompts are left-padded to a multiple of this many tokens (see prompt_width)


def prompt_width(length: int, bucket: int = PROMPT_BUCKET) -> int:
    """The width a prompt of ``length`` tokens is left-padded to (a multiple of ``bucket``),
    whoever shares its batch.

    ONNX Runtime's attention sums over the whole key length, so the same keys padded to another
    width round differently in the last bit; the int8 route's per-token quantiser turns such a
    bit into a different code now and then, and 30 layers grow that into nats. A width that
    depends on the prompt alone, and batches that only join prompts of one width
    (:func:`by_width`), make a user's result the same bits alone or in any batch."""
    return -(-length // bucket) * bucket


def by_width(encoded: Sequence[Encoded], bucket: int = PROMPT_BUCKET) -> list[list[int]]:
    """Indices of ``encoded`` grouped by :func:`prompt_width`, each group in input order: the
    batches that run together."""
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(encoded):
        groups.setdefault(prompt_width(len(p), bucket), []).append(i)
    return list(groups.values())


def batches(backend: Backend, encoded: Sequence[Encoded], bucket: int = PROMPT_BUCKET) -> list[list[int]]:
    """The batches a request's prompts run in: one per :func:`prompt_width` where the backend's
    results move with their padding (:attr:`Backend.exact_layout`, the CPU's int8 route), so
    that a user's result is the same bits alone or in company; else all of them together,
    padded to the widest (native arithmetic: within rounding of alone, in a bounded number
    of passes)."""
    return by_width(encoded, bucket) if backend.exact_layout else [list(range(len(encoded)))]


@dataclass(frozen=True)
class Prefilled:
    """Prompts run once, left-padded to one :func:`prompt_width`, so every prompt ends at the
    last column."""

    logprobs: np.ndarray  # [U, V] next-token log-probabilities after each prompt
    cache: Any  # the backend's cache, U rows of width W
    key_segments: np.ndarray  # [U, W] segment ids of the cached tokens (0 under padding)
    key_valid: np.ndarray  # [U, W] False under padding
    lengths: np.ndarray  # [U] prompt lengths (= the next position)


def prefill(backend: Backend, encoded: Sequence[Encoded], bucket: int = PROMPT_BUCKET) -> Prefilled:
    """Run a batch of prompts in one pass (of the widest prompt's :func:`prompt_width`): what
    beam search and candidate scoring start from."""
    width = prompt_width(max(len(p) for p in encoded), bucket)
    ids, segs, valid = left_padded([(p.ids, p.segments) for p in encoded], width)
    masks = build_masks(segs, segs, causal_visibility(valid, width))
    logits, cache = backend.forward(ids, padded_positions(valid), masks, None, last_only=True)
    lengths = np.asarray([len(p) for p in encoded], dtype=np.int64)
    return Prefilled(log_softmax(logits.astype(np.float32)), cache, segs, valid, lengths)
