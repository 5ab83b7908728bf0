"""The collaborative assistant: SASRec's next-item distribution over the catalog, read from its
ONNX graph with ONNX Runtime (no torch), for fusion into the LLM's ranking (D3, Bao et al. 2024).

A SASRec checkpoint (``hatllm-edge sasrec train``) or a bundle's ``assistant/`` folder holds
``sasrec.json`` (item id order, ``max_len``, and for a bundle the fusion weight chosen on
validation) and ``sasrec.onnx``: ``item_ids`` [B, L] int64 of catalog positions + 1, left-padded
with 0, oldest first -> ``scores`` [B, num_items] log-probabilities in catalog order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hatllm_edge.core.data import Catalog
from hatllm_edge.core.errors import InputError
from hatllm_edge.core.formats import (
    ASSISTANT_CONFIG,
    ASSISTANT_INPUT,
    ASSISTANT_ONNX,
    ASSISTANT_OUTPUT,
    SASREC_FORMAT,
)

PAD = 0


def catalog_ids(catalog: Catalog, items: Sequence[str]) -> list[int]:
    """Item ids -> model ids (catalog position + 1)."""
    return [catalog.index(i) + 1 for i in items]


def left_pad(rows: Sequence[Sequence[int]], width: int) -> np.ndarray:
    """Rows of model ids -> [len(rows), width] int64, each row's last ``width`` ids, left-padded."""
    out = np.zeros((len(rows), width), dtype=np.int64)
    for r, row in enumerate(rows):
        row = list(row)[-width:] if width else []
        if row:
            out[r, width - len(row) :] = row
    return out


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / ASSISTANT_CONFIG
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raise InputError(f"{folder}: not a SASRec checkpoint (no {ASSISTANT_CONFIG})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg})") from None
    if meta.get("format") != SASREC_FORMAT:
        raise InputError(f"{path}: format {meta.get('format')!r}, expected {SASREC_FORMAT!r}")
    return meta


def ort_session(path: Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@dataclass
class Assistant:
    """SASRec on ONNX Runtime: item log-probabilities for histories of catalog item ids."""

    session: Any
    catalog: Catalog
    max_len: int
    weight: float  # the fusion weight the bundle was validated with (0 when not chosen)
    folder: Path

    @classmethod
    def open(cls, folder: Path, catalog: Catalog, threads: int | None = None) -> "Assistant":
        folder = Path(folder)
        meta = read_config(folder)
        if tuple(meta.get("item_ids", ())) != catalog.item_ids:
            raise InputError(f"{folder}: the assistant's item ids differ from the model's catalog (order or content); "
                             "train it on the same data set")
        if not (folder / ASSISTANT_ONNX).is_file():
            raise InputError(f"{folder}: no {ASSISTANT_ONNX}; run 'hatllm-edge sasrec export {folder}'")
        return cls(ort_session(folder / ASSISTANT_ONNX, threads), catalog, int(meta["model"]["max_len"]),
                   float(meta.get("fusion", {}).get("weight", 0.0)), folder)

    def scores(self, ids: np.ndarray) -> np.ndarray:
        """``item_ids`` rows (model ids, left-padded) -> [B, N] log-probabilities (float32)."""
        return self.session.run([ASSISTANT_OUTPUT], {ASSISTANT_INPUT: ids})[0]

    def logprobs(self, histories: Sequence[Sequence[str]]) -> np.ndarray:
        """[U, N] next-item log-probabilities, catalog order, for histories of item ids (the
        last ``max_len`` items are read). Normalised in float64, so they sum to 1 to within rounding."""
        x = left_pad([catalog_ids(self.catalog, h) for h in histories], self.max_len)
        s = self.scores(x).astype(np.float64)
        s -= s.max(axis=1, keepdims=True)
        return s - np.log(np.exp(s).sum(axis=1, keepdims=True))
