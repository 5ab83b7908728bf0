"""``hatllm-edge rank``: read a user's request, open the model, rank, and time it.

Every size the request controls is bounded (:mod:`hatllm_edge.limits`); what can be checked
without the model is checked before it is loaded.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hatllm_edge.errors import InputError
from hatllm_edge.engine import Compute, cache_root, read_bundle_meta
from hatllm_edge.limits import (DEFAULT_K, MAX_BEAMS, MAX_CANDIDATES, MAX_HISTORY, MAX_K, MAX_REF_CHARS, MAX_REQUEST_BYTES,
                                beam_width)
from hatllm_edge.ranker import DEFAULT_CHECKPOINT, BundleBuilder, Device, Ranker, cached_bundle, model_kind, open_model, show

log = logging.getLogger("hatllm_edge")
FIELDS = ("history", "candidates", "k", "beams", "user_id", "assist")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise InputError(f"field {key!r} appears twice")
        seen[key] = value
    return seen


def _check_text(value: str, where: str) -> None:
    if len(value) > MAX_REF_CHARS:
        raise InputError(f"{where}: {show(value)} has {len(value):,} characters; the limit is {MAX_REF_CHARS}: "
                         "give the item's id or its exact catalog title")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{where}: {show(value)} is not valid Unicode (a lone surrogate escape)") from None


def _check_refs(refs: Any, field: str, limit: int, path: Path) -> None:
    if not isinstance(refs, list) or not refs:
        raise InputError(f"{path}: field {field!r} must be a non-empty list of item ids or titles"
                         + (", oldest first" if field == "history" else ""))
    if len(refs) > limit:
        raise InputError(f"{path}: field {field!r} has {len(refs):,} items; the limit is {limit:,}"
                         + (": send the most recent ones" if field == "history" else ": split the request"))
    for n, ref in enumerate(refs):
        if isinstance(ref, bool) or not isinstance(ref, (str, int)):
            raise InputError(f"{path}: {field}[{n}]: expected an item id or title (string or integer), got {show(ref)}")
        _check_text(str(ref), f"{path}: {field}[{n}]")


def _check_int(req: dict[str, Any], field: str, limit: int, what: str, path: Path) -> None:
    if field not in req:
        return
    value = req[field]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{path}: field {field!r} must be an integer from 1 to {limit} ({what}), got {show(value)}")
    if not 1 <= value <= limit:
        raise InputError(f"{path}: field {field!r} is {show(value)}; it must be from 1 to {limit} ({what})")


def read_request(path: Path) -> dict[str, Any]:
    """The request: ``history`` (non-empty list), optional ``candidates`` (list), ``k`` and
    ``beams`` (ints), ``assist`` (bool: fuse the model's assistant) and ``user_id``; every size
    within :mod:`hatllm_edge.limits`."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_REQUEST_BYTES + 1)
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror or e})") from None
    if len(raw) > MAX_REQUEST_BYTES:
        raise InputError(f"{path}: larger than the {MAX_REQUEST_BYTES // 2**20} MiB a request may have")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save it as UTF-8") from None
    try:
        req = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply; a request is one object of lists of ids or titles") from None
    except InputError as e:
        raise InputError(f"{path}: {e}") from None
    except ValueError as e:  # Python reads no integer of more than 4,300 digits
        why = "an integer with more than 4,300 digits" if "digits" in str(e) else " ".join(str(e).split())[:100]
        raise InputError(f"{path}: not a usable JSON value ({why})") from None
    if not isinstance(req, dict):
        raise InputError(f'{path}: expected a JSON object like {{"history": [...]}}')
    unknown = set(req) - set(FIELDS)
    if unknown:
        names = sorted(show(u, 40) for u in unknown)[:5]
        raise InputError(f"{path}: unknown field(s) {', '.join(names)}; allowed: {', '.join(FIELDS)}")
    _check_refs(req.get("history"), "history", MAX_HISTORY, path)
    if "candidates" in req:
        _check_refs(req["candidates"], "candidates", MAX_CANDIDATES, path)
    _check_int(req, "k", MAX_K, "the list length", path)
    _check_int(req, "beams", MAX_BEAMS, "the beam width", path)
    if not isinstance(req.get("assist", True), bool):
        raise InputError(f"{path}: field 'assist' must be true or false, got {show(req['assist'])}")
    user_id = req.get("user_id")
    if user_id is not None:
        if isinstance(user_id, bool) or not isinstance(user_id, (str, int)):
            raise InputError(f"{path}: field 'user_id' must be a string or an integer, got {show(user_id)}")
        _check_text(str(user_id), f"{path}: user_id")
    return req


def open_ranker(model: Path | None, device: Device, quant: str | None, backend: str, threads: int | None, progress: bool,
                compute: Compute = "auto", build: BundleBuilder | None = None) -> Ranker:
    """The ranker for ``model`` (default: the shipped checkpoint); a checkpoint run on the
    engine is exported once into the bundle cache by ``build`` (``quant``, default int4).
    Every option either applies to what runs or is refused."""
    folder = model or DEFAULT_CHECKPOINT
    if not folder.is_dir():
        raise InputError(f"model {folder}: no such folder" + ("" if model else " (the default model ships in models/; pass --model)"))
    kind = model_kind(folder)
    if backend == "torch":
        if kind != "checkpoint":
            raise InputError(f"{folder}: --backend torch needs a checkpoint folder, this is an ONNX bundle")
        if device != "cpu":
            raise InputError("--backend torch runs on the CPU here; use the onnx backend for --device cuda")
        if compute != "auto" or quant is not None:
            raise InputError("--compute and --quant choose the engine's bundle and arithmetic; --backend torch runs the "
                             "checkpoint in PyTorch fp32 (drop them, or use the onnx backend)")
        if threads:
            import torch

            torch.set_num_threads(threads)
        return open_model(folder)
    cache_root()  # an unusable $HATLLM_CACHE is refused here, before anything is loaded
    if kind == "checkpoint":
        folder = cached_bundle(folder, quant or "int4", progress=progress, build=build)
    elif quant is not None:
        raise InputError(f"--quant chooses the bundle built from a checkpoint; {folder} is a bundle already "
                         f"(quant {(read_bundle_meta(folder).export or {}).get('quant', '?')}): drop --quant")
    return open_model(folder, device, threads, compute=compute)


def _resolve_candidates(ranker: Ranker, refs: list[Any], where: str) -> list[int]:
    """Catalog indices of the candidates; one item named twice is refused."""
    candidates = ranker.resolve(refs, where)
    first: dict[int, int] = {}
    for n, i in enumerate(candidates):
        if i in first:
            raise InputError(f"{where}[{n}]: {show(refs[n])} is the same item as {where.rsplit(': ', 1)[-1]}[{first[i]}] "
                             f"({show(refs[first[i]])}); list each candidate once")
        first[i] = n
    return candidates


@dataclass(frozen=True)
class RankOptions:
    """What ``hatllm-edge rank`` was asked on the command line (None: the request's, else the default)."""

    model: Path | None = None  # bundle or checkpoint (default: the shipped checkpoint)
    k: int | None = None  # overrides the request's k
    beams: int | None = None  # overrides the request's beams; the search is max(beams, k) wide
    device: Device = "cpu"
    quant: str | None = None  # the bundle built from a checkpoint (default int4)
    backend: str = "onnx"  # or torch (a checkpoint in PyTorch fp32)
    compute: Compute = "auto"
    threads: int | None = None
    normalize: bool = False  # length-normalise candidate scores
    exclude_history: bool = False  # drop items the user already has (loo-full keeps them; a product usually not)
    assist: bool | None = None  # fuse the model's assistant (default: the request's "assist", else on)


def run_rank(user: Path, opts: RankOptions, progress: bool = True, build: BundleBuilder | None = None) -> dict[str, Any]:
    """Rank for one request: full-catalog top-k by beam search, or the request's candidates. A
    list for k <= beams is a prefix of a longer one with the same beams."""
    k, beams, assist, exclude_history = opts.k, opts.beams, opts.assist, opts.exclude_history
    req = read_request(user)
    for name, value, limit, what in (("--k", k, MAX_K, "the list length"), ("--beams", beams, MAX_BEAMS, "the beam width")):
        if value is not None and not 1 <= value <= limit:
            raise InputError(f"{name} is {value}; it must be from 1 to {limit} ({what})")
    asked = k or req.get("k")
    beams = beams or req.get("beams")
    ranker = open_ranker(opts.model, opts.device, opts.quant, opts.backend, opts.threads, progress, opts.compute, build)
    size = len(ranker.catalog)
    if asked is not None and asked > size:
        raise InputError(f"k is {asked} but the catalog has {size} items; ask for at most {size}")
    k = asked or min(DEFAULT_K, size)
    history = ranker.resolve(req["history"], f"{user}: history")
    cut = ranker.prompts.max_history
    if cut and len(history) > cut:
        log.warning("%s: the history has %d items; the model reads only the last %d (its max_history), "
                    "the oldest %d are left out", user, len(history), cut, len(history) - cut)
    assist = req.get("assist", True) if assist is None else assist
    start = time.perf_counter()
    width = beam_width(k, beams)
    if "candidates" in req:
        candidates = _resolve_candidates(ranker, req["candidates"], f"{user}: candidates")
        ranked = ranker.score(history, candidates, opts.normalize, assist=assist)
        items, scores = [candidates[i] for i in ranked.items], ranked.scores
        mode = "candidates"
    else:
        # ask for enough to fill k after dropping history items; the width stays max(beams, k)
        wanted = min(k + len(set(history)), size) if exclude_history else k
        ranked = ranker.top_k([history], k=wanted, beams=width, assist=assist)[0]
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
    out: dict[str, Any] = {"user_id": req.get("user_id"), "mode": mode, "backend": ranker.label,
                           "assistant_weight": ranker.scoring(assist)[1]}
    if mode == "full-catalog":
        out["beams"] = width
    return {**out, "latency_ms": round(latency, 2), "results": rows}
