"""HatLLM's three attention-mask kinds and the layer schedule: the one definition.

Training, evaluation, attention analysis, ONNX export and the ONNX Runtime engine all call
:func:`build_masks`. It is written with array operators only, so it runs unchanged on NumPy
arrays (the torch-free engine) and on torch tensors (training, the PyTorch backend).

Mask kinds (``True`` = may attend), for a query token q and key token k with segment ids
``s_q``/``s_k`` (0 = belongs to no item) and base visibility ``V`` (causal, key not padding):

* ``or`` (original): ``V``
* ``in`` (intra-item): ``V & (s_q == 0 | s_k == 0 | s_q == s_k)``
* ``cr`` (cross-item): ``V & (s_q == 0 | s_k == 0 | s_q != s_k)``, plus the token itself

Every token always sees itself, so no row is empty (also for padding rows).

A sliding-window layer (Gemma 3's local layers) further keeps only the keys fewer than
``window`` positions back (:func:`sliding_band`), on positions, not on cache columns: beam
search and candidate scoring lay continuations side by side, so their columns run ahead of
their positions.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np

from hatllm_edge.core.errors import InputError

MaskKind = Literal["in", "or", "cr"]
MASK_KINDS: tuple[MaskKind, ...] = ("in", "or", "cr")


@dataclass(frozen=True)
class LayerSchedule:
    """Which mask kind each decoder layer uses: ``n_in`` shallow IN layers, ``n_cr`` deep CR
    layers, OR in between. ``n_in = n_cr = 0`` is the plain causal model."""

    num_layers: int
    n_in: int = 0
    n_cr: int = 0

    def __post_init__(self) -> None:
        if min(self.num_layers, self.n_in, self.n_cr) < 0 or self.n_in + self.n_cr > self.num_layers:
            raise InputError(
                f"layer schedule needs 0 <= n_in + n_cr <= num_layers, got n_in={self.n_in}, "
                f"n_cr={self.n_cr}, num_layers={self.num_layers}"
            )

    @property
    def kinds(self) -> list[MaskKind]:
        n_or = self.num_layers - self.n_in - self.n_cr
        return ["in"] * self.n_in + ["or"] * n_or + ["cr"] * self.n_cr

    def to_dict(self) -> dict[str, int]:
        return {"num_layers": self.num_layers, "n_in": self.n_in, "n_cr": self.n_cr}


def _xp(a: Any) -> Any:
    """The array module of ``a``: numpy, or torch for tensors (taken from ``sys.modules``: a
    tensor means torch is loaded, and the engine's layers never import it)."""
    return np if isinstance(a, np.ndarray) else sys.modules["torch"]


def left_padded(rows: Sequence[tuple[np.ndarray, np.ndarray]], width: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token ids, segment ids) rows left-padded to ``width`` (default: the longest), so every
    row's last token sits in the last column: ids, segments [B, W] int64 and validity [B, W]."""
    width = width or max(len(ids) for ids, _ in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    segs = np.zeros((len(rows), width), dtype=np.int64)
    valid = np.zeros((len(rows), width), dtype=bool)
    for r, (row_ids, row_segs) in enumerate(rows):
        ids[r, width - len(row_ids) :], segs[r, width - len(row_ids) :], valid[r, width - len(row_ids) :] = row_ids, row_segs, True
    return ids, segs, valid


def padded_positions(valid: np.ndarray) -> np.ndarray:
    """Position ids of left-padded rows [B, W]: each row counts from 0 at its first real token (0 under padding)."""
    return np.maximum(np.cumsum(valid, axis=1) - 1, 0)


def causal_visibility(key_valid: Any, num_queries: int) -> Any:
    """Base visibility for ``num_queries`` new tokens appended after the cached ones.

    key_valid: [B, K] bool, False for padding keys; the last ``num_queries`` keys are the
    queries themselves. Returns [B, Q, K] bool: causal and not padding.
    """
    xp = _xp(key_valid)
    num_keys = key_valid.shape[-1]
    q_col = xp.arange(num_queries) + (num_keys - num_queries)  # key column of each query
    causal = xp.arange(num_keys)[None, :] <= q_col[:, None]  # [Q, K]
    return causal[None, :, :] & key_valid[:, None, :]


def packed_visibility(prompt_valid: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Base visibility of packed rows: several candidates' tokens share a row after the cached
    prompt; each sees the prompt's real tokens and the earlier tokens of its own candidate only.

    prompt_valid: [R, P] bool (False under padding); owner: [R, W] int, the candidate each fed
    token belongs to (-1 for padding). Returns [R, W, P + W] bool, for :func:`build_masks`.
    """
    rows, width = owner.shape
    own = (owner[:, :, None] == owner[:, None, :]) & (owner[:, :, None] >= 0)
    prompt = np.broadcast_to(prompt_valid[:, None, :], (rows, width, prompt_valid.shape[1]))
    return np.concatenate([prompt, own & np.tril(np.ones((width, width), dtype=bool))], axis=2)


def self_positions(batch: int, num_queries: int, num_keys: int, like: Any) -> Any:
    """[B, Q, K] bool, True where the key is the query token itself (queries are the last keys)."""
    xp = _xp(like)
    q_col = xp.arange(num_queries) + (num_keys - num_queries)
    eye = xp.arange(num_keys)[None, :] == q_col[:, None]
    if xp is np:
        return np.broadcast_to(eye[None], (batch, num_queries, num_keys))
    return eye[None].expand(batch, num_queries, num_keys)


def build_masks(
    query_segments: Any,
    key_segments: Any,
    visible: Any,
    kinds: Sequence[MaskKind] = MASK_KINDS,
) -> dict[MaskKind, Any]:
    """The boolean masks [B, 1, Q, K] of each requested kind.

    query_segments: [B, Q] int, key_segments: [B, K] int (item index in the prompt, 0 = no
    item); visible: [B, Q, K] bool base visibility (see :func:`causal_visibility`; a packed
    layout may restrict it further). The queries must be the last Q keys.
    """
    batch, num_queries, num_keys = visible.shape
    sq = query_segments[:, :, None]
    sk = key_segments[:, None, :]
    free = (sq == 0) | (sk == 0)
    itself = self_positions(batch, num_queries, num_keys, visible)
    out: dict[MaskKind, Any] = {}
    for kind in kinds:
        if kind == "or":
            m = visible | itself
        elif kind == "in":
            m = (visible & (free | (sq == sk))) | itself
        elif kind == "cr":
            m = (visible & (free | (sq != sk))) | itself
        else:
            raise ValueError(f"unknown mask kind {kind!r}; expected one of {MASK_KINDS}")
        out[kind] = m[:, None, :, :]
    return out



def sliding_band(query_positions: Any, key_positions: Any, window: int) -> Any:
    """[B, Q, K] bool: a query sees a key fewer than ``window`` positions back (Hugging Face's
    sliding-window rule, which counts cache slots: the same where the keys are one contiguous
    sequence, as in training; the export's graph computes the same from its ``key_positions``).

    query_positions [B, Q], key_positions [B, K] int (the cached keys', then the queries').
    Keys at later positions pass (causality is the masks' business), so a token always sees
    itself."""
    return query_positions[:, :, None] - key_positions[:, None, :] < window
