"""``hatllm-edge rank``: read a user's request, open the model, rank, and time it.

Every size the request controls is bounded (:mod:`hatllm_edge.core.limits`); what can be checked
without the model is checked before it is loaded.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from hatllm_edge.app.models import (
    BundleBuilder,
    cached_bundle,
    default_checkpoint,
    model_kind,
    open_model,
)
from hatllm_edge.core.errors import InputError
from hatllm_edge.core.limits import (
    DEFAULT_K,
    MAX_BEAMS,
    MAX_CANDIDATES,
    MAX_HISTORY,
    MAX_K,
    MAX_REF_CHARS,
    MAX_REQUEST_BYTES,
    beam_width,
)
from hatllm_edge.engine.session import Compute, cache_root, read_bundle_meta
from hatllm_edge.ranking.ranker import Device, Ranker, show

log = logging.getLogger("hatllm_edge")
FIELDS = ("history", "candidates", "k", "beams", "user_id", "assist")
Backend = Literal["onnx", "torch"]  # the engine (a bundle), or PyTorch fp32 (a checkpoint)
BACKENDS: tuple[Backend, ...] = get_args(Backend)


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


def _check_refs(refs: Any, field: str, limit: int, path: str) -> None:
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


def _check_int(req: dict[str, Any], field: str, limit: int, what: str, path: str) -> None:
    if field not in req:
        return
    value = req[field]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{path}: field {field!r} must be an integer from 1 to {limit} ({what}), got {show(value)}")
    if not 1 <= value <= limit:
        raise InputError(f"{path}: field {field!r} is {show(value)}; it must be from 1 to {limit} ({what})")


def read_request(path: Path) -> dict[str, Any]:
    """The request in the JSON file ``path`` (see :func:`check_request`)."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_REQUEST_BYTES + 1)
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror or e})") from None
    return parse_request(raw, str(path))


def parse_request(raw: bytes, path: str) -> dict[str, Any]:
    """A request from the bytes of a JSON document (a file, an HTTP body); errors name ``path``."""
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
    return check_request(req, path)


def check_request(req: Any, path: str) -> dict[str, Any]:
    """A parsed request, checked before any model is loaded: ``history`` (non-empty list),
    optional ``candidates`` (list), ``k`` and ``beams`` (ints), ``assist`` (bool: fuse the
    model's assistant) and ``user_id``; every size within :mod:`hatllm_edge.core.limits`. Errors
    name ``path`` (the file, or the request's place in a batch)."""
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


def bundle_dtype(device: Device, dtype: str | None = None) -> str:
    """The float type of a bundle built on first use: fp16 on a GPU (same ranking as fp32,
    1.5x faster there), fp32 on the CPU (whose int8 route reads fp32 graphs)."""
    return dtype or ("fp16" if device == "cuda" else "fp32")


def open_ranker(model: Path | None, device: Device, quant: str | None, backend: str, threads: int | None, progress: bool,
                compute: Compute = "auto", build: BundleBuilder | None = None, dtype: str | None = None,
                cuda_graph: bool = False) -> Ranker:
    """The ranker for ``model`` (default: the shipped checkpoint); a checkpoint run on the
    engine is exported once into the bundle cache by ``build`` (``quant``, default int4;
    ``dtype``, default :func:`bundle_dtype`). Every option either applies to what runs or is refused."""
    folder = _model_folder(model)
    kind = model_kind(folder)
    if backend == "torch":
        if kind != "checkpoint":
            raise InputError(f"{folder}: --backend torch needs a checkpoint folder, this is an ONNX bundle")
        if device != "cpu":
            raise InputError("--backend torch runs on the CPU here; use the onnx backend for --device cuda")
        if compute != "auto" or quant is not None or dtype is not None or cuda_graph:
            raise InputError("--compute, --quant, --dtype and --cuda-graph choose the engine's bundle and arithmetic; --backend torch runs the "
                             "checkpoint in PyTorch fp32 (drop them, or use the onnx backend)")
        if threads:
            import torch

            torch.set_num_threads(threads)
        return open_model(folder)
    if kind == "bundle" and (quant is not None or dtype is not None):
        export = read_bundle_meta(folder).export or {}
        raise InputError(f"--quant and --dtype choose the bundle built from a checkpoint; {folder} is a bundle already "
                         f"(quant {export.get('quant', '?')}, dtype {export.get('dtype', '?')}): drop them")
    return open_model(open_bundle(folder, progress, build, quant or "int4", bundle_dtype(device, dtype)), device, threads,
                      compute=compute, cuda_graph=cuda_graph)


def _model_folder(model: Path | None) -> Path:
    folder = model or default_checkpoint()
    if not folder.is_dir():
        raise InputError(f"model {folder}: no such folder" + ("" if model else " (the default model ships in models/; pass --model)"))
    return folder


def open_bundle(model: Path | None, progress: bool, build: BundleBuilder | None = None, quant: str = "int4",
                dtype: str = "fp32") -> Path:
    """The bundle the engine runs: ``model`` if it is one, else the checkpoint's cached bundle
    (built by ``build`` on first use; default model: the shipped checkpoint)."""
    folder = _model_folder(model)
    cache_root()  # an unusable $HATLLM_CACHE (bundles built, int8 graphs kept) is refused before anything loads
    if model_kind(folder) == "bundle":
        return folder
    return cached_bundle(folder, quant, dtype, progress=progress, build=build)


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
    dtype: str | None = None  # its float type (default: fp16 on cuda, fp32 on cpu)
    cuda_graph: bool = False  # replay passes as captured CUDA graphs
    backend: Backend = "onnx"  # or torch (a checkpoint in PyTorch fp32)
    compute: Compute = "auto"
    threads: int | None = None
    normalize: bool = False  # length-normalise candidate scores
    exclude_history: bool = True  # leave out items the user already has (a product's default; loo-full keeps them)
    assist: bool | None = None  # fuse the model's assistant (default: the request's "assist", else on)


@dataclass(frozen=True)
class Prepared:
    """A checked request resolved against a model's catalog: what one ranking needs."""

    user_id: Any
    history: tuple[int, ...]  # catalog indices, oldest first
    candidates: tuple[int, ...] | None  # catalog indices; None: full-catalog top-k
    k: int
    width: int  # the beam width of a full-catalog search
    assist: bool
    normalize: bool
    exclude_history: bool

    def group(self) -> tuple[Any, ...]:
        """Requests with the same group rank together in one engine call; each one's result
        is then what it would be alone (batching never changes a result: tests/test_invariance.py)."""
        if self.candidates is not None:
            return ("candidates", self.assist, self.normalize)
        return ("full-catalog", self.assist, self.k, self.width, self.exclude_history)


def check_options(opts: RankOptions) -> None:
    """The overrides' bounds, checked before a model is loaded."""
    for name, value, limit, what in (("--k", opts.k, MAX_K, "the list length"), ("--beams", opts.beams, MAX_BEAMS, "the beam width")):
        if value is not None and not 1 <= value <= limit:
            raise InputError(f"{name} is {value}; it must be from 1 to {limit} ({what})")


def prepare(ranker: Ranker, req: dict[str, Any], where: str, opts: RankOptions) -> Prepared:
    """Resolve a checked request (:func:`check_request`) against the model; ``opts`` (the
    command line's or the server's, :func:`check_options`) override the request's k, beams
    and assist."""
    size = len(ranker.catalog)
    asked = opts.k or req.get("k")
    if asked is not None and asked > size:
        raise InputError(f"k is {asked} but the catalog has {size} items; ask for at most {size}")
    k = asked or min(DEFAULT_K, size)
    history = ranker.resolve(req["history"], f"{where}: history")
    cut = ranker.prompts.max_history
    if cut and len(history) > cut:
        log.warning("%s: the history has %d items; the model reads only the last %d (its max_history), "
                    "the oldest %d are left out", where, len(history), cut, len(history) - cut)
    candidates = _resolve_candidates(ranker, req["candidates"], f"{where}: candidates") if "candidates" in req else None
    return Prepared(req.get("user_id"), tuple(history), None if candidates is None else tuple(candidates), k,
                    beam_width(k, opts.beams or req.get("beams")), req.get("assist", True) if opts.assist is None else opts.assist,
                    opts.normalize, opts.exclude_history)


def rank_prepared(ranker: Ranker, requests: list[Prepared]) -> list[dict[str, Any]]:
    """Rank requests in as few engine calls as their groups allow; results in request order,
    each in ``rank``'s JSON rows (``latency_ms``: its group's wall time)."""
    results: list[dict[str, Any]] = [{} for _ in requests]
    groups: dict[tuple[Any, ...], list[int]] = {}
    for n, p in enumerate(requests):
        groups.setdefault(p.group(), []).append(n)
    size = len(ranker.catalog)
    for members in groups.values():
        batch = [requests[n] for n in members]
        first = batch[0]
        start = time.perf_counter()
        if first.candidates is not None:
            ranked = ranker.score_batch([p.history for p in batch], [p.candidates for p in batch],  # type: ignore[misc]
                                        first.normalize, assist=first.assist)
            lists = [([p.candidates[i] for i in r.items], r.scores) for p, r in zip(batch, ranked)]  # type: ignore[index]
        else:
            ranked = ranker.top_k([p.history for p in batch], k=min(first.k, size), beams=first.width, assist=first.assist,
                                  exclude_history=first.exclude_history)
            lists = [(r.items, r.scores) for r in ranked]
        latency = (time.perf_counter() - start) * 1000
        for n, p, (items, scores) in zip(members, batch, lists):
            results[n] = _result(ranker, p, list(items), list(scores), latency)
    return results


def _result(ranker: Ranker, p: Prepared, items: list[int], scores: list[float], latency: float) -> dict[str, Any]:
    if p.exclude_history:
        seen = set(p.history)
        kept = [(i, s) for i, s in zip(items, scores) if i not in seen]
        items, scores = [i for i, _ in kept], [s for _, s in kept]
    rows = [{"rank": r + 1, "item_id": ranker.catalog.item_ids[i], "title": ranker.catalog.titles[i], "score": round(s, 4)}
            for r, (i, s) in enumerate(zip(items[: p.k], scores[: p.k]))]
    mode = "candidates" if p.candidates is not None else "full-catalog"
    renormalise, weight = ranker.scoring(p.assist)
    out: dict[str, Any] = {"user_id": p.user_id, "mode": mode, "backend": ranker.label, "renormalise": renormalise,
                           "assistant_weight": weight, "history": "excluded" if p.exclude_history else "included"}
    if mode == "full-catalog":
        out["beams"] = p.width
    return {**out, "latency_ms": round(latency, 2), "results": rows}


def run_rank(user: Path, opts: RankOptions, progress: bool = True, build: BundleBuilder | None = None) -> dict[str, Any]:
    """Rank for one request file: full-catalog top-k by beam search, or the request's
    candidates. A list for k <= beams is a prefix of a longer one with the same beams."""
    req = read_request(user)
    check_options(opts)
    ranker = open_ranker(opts.model, opts.device, opts.quant, opts.backend, opts.threads, progress, opts.compute, build,
                         opts.dtype, opts.cuda_graph)
    return rank_prepared(ranker, [prepare(ranker, req, str(user), opts)])[0]
