"""``hatllm-edge rank``: read a user's request, open the model, rank, and time it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from hatllm_edge.errors import InputError
from hatllm_edge.engine import Compute
from hatllm_edge.ranker import DEFAULT_CHECKPOINT, Device, Ranker, cached_bundle, model_kind, open_model


def read_request(path: Path) -> dict[str, Any]:
    """The request: ``history`` (non-empty list), optional ``candidates`` (list) and ``k`` (int)."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        req = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(req, dict):
        raise InputError(f'{path}: expected a JSON object like {{"history": [...]}}')
    unknown = set(req) - {"history", "candidates", "k", "user_id"}
    if unknown:
        raise InputError(f"{path}: unknown field(s) {sorted(unknown)}; allowed: history, candidates, k, user_id")
    if not isinstance(req.get("history"), list) or not req["history"]:
        raise InputError(f"{path}: field 'history' must be a non-empty list of item ids or titles, oldest first")
    if "candidates" in req and (not isinstance(req["candidates"], list) or not req["candidates"]):
        raise InputError(f"{path}: field 'candidates' must be a non-empty list of item ids or titles")
    if "k" in req and (not isinstance(req["k"], int) or isinstance(req["k"], bool) or req["k"] < 1):
        raise InputError(f"{path}: field 'k' must be a positive integer")
    return req


def open_ranker(model: Path | None, device: Device, quant: str, backend: str, threads: int | None, progress: bool,
                compute: Compute = "auto") -> Ranker:
    """The ranker for ``model`` (default: the shipped checkpoint); a checkpoint run on the
    engine is exported once into the bundle cache."""
    folder = model or DEFAULT_CHECKPOINT
    if not folder.is_dir():
        raise InputError(f"model {folder}: no such folder" + ("" if model else " (the default model ships in models/; pass --model)"))
    kind = model_kind(folder)
    if backend == "torch":
        if kind != "checkpoint":
            raise InputError(f"{folder}: --backend torch needs a checkpoint folder, this is an ONNX bundle")
        if device != "cpu":
            raise InputError("--backend torch runs on the CPU here; use the onnx backend for --device cuda")
        return open_model(folder)
    if kind == "checkpoint":
        folder = cached_bundle(folder, quant, progress=progress)
    return open_model(folder, device, threads, compute=compute)


def run_rank(
    user: Path, model: Path | None, k: int | None, device: Device, quant: str, backend: str, threads: int | None,
    normalize: bool, progress: bool, exclude_history: bool = False, compute: Compute = "auto",
) -> dict[str, Any]:
    """Rank for one request. ``exclude_history`` drops items the user already has (the
    ``loo-full`` protocol keeps them; a product usually does not)."""
    req = read_request(user)
    ranker = open_ranker(model, device, quant, backend, threads, progress, compute)
    history = ranker.resolve(req["history"], f"{user}: history")
    k = k or req.get("k", 10)
    start = time.perf_counter()
    if "candidates" in req:
        candidates = ranker.resolve(req["candidates"], f"{user}: candidates")
        ranked = ranker.score(history, candidates, normalize)
        items, scores = [candidates[i] for i in ranked.items], ranked.scores
        mode = "candidates"
    else:
        extra = len(set(history)) if exclude_history else 0  # ask for enough to fill k after dropping
        ranked = ranker.top_k([history], k=k + extra, beams=k + extra)[0]
        items, scores = ranked.items, ranked.scores
        mode = "full-catalog"
    if exclude_history:
        seen = set(history)
        kept = [(i, s) for i, s in zip(items, scores) if i not in seen]
        items, scores = [i for i, _ in kept], [s for _, s in kept]
    items, scores = items[:k], scores[:k]
    latency = (time.perf_counter() - start) * 1000
    rows = [
        {"rank": r + 1, "item_id": ranker.catalog.item_ids[i], "title": ranker.catalog.titles[i], "score": round(s, 4)}
        for r, (i, s) in enumerate(zip(items, scores))
    ]
    return {
        "user_id": req.get("user_id"),
        "mode": mode,
        "backend": ranker.label,
        "latency_ms": round(latency, 2),
        "results": rows,
    }

