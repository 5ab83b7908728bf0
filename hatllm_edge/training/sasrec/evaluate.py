"""loo-full evaluation of SASRec, from PyTorch or its ONNX graph: full-catalog ranks, HR and NDCG."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from hatllm_edge.core.data import (
    Catalog,
    Dataset,
    Example,
    Split,
    history_protocol,
    load_dataset,
)
from hatllm_edge.core.errors import InputError
from hatllm_edge.core.formats import ASSISTANT_INPUT as ONNX_INPUT
from hatllm_edge.core.formats import ASSISTANT_ONNX as ONNX_FILE
from hatllm_edge.core.formats import ASSISTANT_OUTPUT as ONNX_OUTPUT
from hatllm_edge.core.metrics import mean_metrics
from hatllm_edge.ranking.assistant import (
    catalog_ids,
    left_pad,
    ort_session,
    read_config,
)
from hatllm_edge.training.sasrec.checkpoint import _check_catalog, load_checkpoint
from hatllm_edge.training.sasrec.model import SASRec

Scorer = Callable[[np.ndarray], np.ndarray]  # [B, L] int64 model ids -> [B, num_items] scores


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each row's target (a catalog position) among all items; ties go to the
    item earlier in the catalog (as a stable sort by descending score would order them)."""
    scores = np.asarray(scores)
    rows = np.arange(len(targets))
    t = scores[rows, targets][:, None]
    earlier = np.arange(scores.shape[1])[None, :] < targets[:, None]
    return ((scores > t) | ((scores == t) & earlier)).sum(axis=1)


def rank_examples(scorer: Scorer, examples: Sequence[Example], catalog: Catalog, max_len: int, batch_size: int = 256,
                  exclude: Callable[[Example], set[int]] | None = None) -> dict[str, int]:
    """User -> 0-based rank of the target in the whole catalog; ``exclude`` (example -> catalog
    indices) leaves those items out of the ranking, as the LLM's search does with the history."""
    out: dict[str, int] = {}
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        x = left_pad([catalog_ids(catalog, ex.history) for ex in chunk], max_len)
        scores = scorer(x)
        if scores.shape != (len(chunk), len(catalog)):
            raise ValueError(f"scorer returned shape {scores.shape}, expected {(len(chunk), len(catalog))}")
        if exclude is not None:
            scores = np.array(scores, dtype=np.float64)
            for row, ex in enumerate(chunk):
                scores[row, sorted(exclude(ex))] = -np.inf
        ranks = target_ranks(scores, np.array([catalog.index(ex.target) for ex in chunk]))
        out.update({ex.user_id: int(r) for ex, r in zip(chunk, ranks)})
    return out


def torch_scorer(model: SASRec) -> Scorer:
    def score(x: np.ndarray) -> np.ndarray:
        was = model.training
        model.eval()
        try:
            with torch.inference_mode():
                return model.next_item_log_probs(torch.from_numpy(x)).numpy()
        finally:
            model.train(was)

    return score


def onnx_scorer(path: Path, threads: int | None = None) -> Scorer:
    sess = ort_session(path, threads)
    return lambda x: sess.run([ONNX_OUTPUT], {ONNX_INPUT: x})[0]


def evaluate_scorer(scorer: Scorer, data: Dataset, split: Split, max_len: int, batch_size: int = 256,
                    exclude_history: bool = False) -> dict[str, Any]:
    """loo-full metrics of ``split`` over every user with a history, and the per-user ranks;
    ``exclude_history``: each user's earlier items are left out of their ranking."""
    examples = data.split(split, max_len)
    exclude = (lambda ex: data.seen(ex.user_id, split)) if exclude_history else None
    ranks = rank_examples(scorer, examples, data.catalog, max_len, batch_size, exclude)
    return {"split": split, **history_protocol(data, examples, split, exclude_history), "users": len(ranks),
            "metrics": mean_metrics(list(ranks.values())), "ranks": ranks}


def evaluate_checkpoint(
    folder: Path, split: Split, dataset: str = "ml-100k", interactions: Path | None = None, items: Path | None = None,
    backend: str = "torch", onnx_path: Path | None = None, threads: int | None = None, batch_size: int = 256,
    exclude_history: bool = False,
) -> dict[str, Any]:
    """loo-full evaluation of a checkpoint on the PyTorch model or its ONNX graph (``backend``
    "onnx": ``onnx_path`` or the folder's ``sasrec.onnx``). The result has ``model``, ``split``,
    ``users``, ``metrics`` and per-user ``ranks`` (full-catalog, 0-based): the JSON that
    :func:`hatllm_edge.core.metrics.compare_runs` reads."""
    folder = Path(folder)
    meta = read_config(folder)
    data = load_dataset(dataset, interactions, items)
    _check_catalog(meta, data.catalog, folder)
    max_len = meta["model"]["max_len"]
    if backend not in ("torch", "onnx"):
        raise InputError(f"backend {backend!r}: expected 'torch' or 'onnx'")
    if threads is not None and threads < 1:
        raise InputError(f"threads {threads} must be at least 1")
    graph = Path(onnx_path) if onnx_path else folder / ONNX_FILE
    if backend == "onnx" and not graph.is_file():
        raise InputError(f"{graph}: no ONNX file (export the checkpoint first: hatllm-edge sasrec export {folder})")
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    scorer = torch_scorer(load_checkpoint(folder)[0]) if backend == "torch" else onnx_scorer(graph, threads)
    res = evaluate_scorer(scorer, data, split, max_len, batch_size, exclude_history)
    wall = time.perf_counter() - t0
    return {"model": "sasrec", "checkpoint": str(folder), "backend": backend, "split": split,
            **{k: res[k] for k in ("history", "repeat_targets") if k in res}, "users": res["users"],
            "metrics": res["metrics"], "wall_s": round(wall, 3), "ranks": res["ranks"]}
