"""``hatllm-edge rank``: read a user's request, open the model, rank, and time it.

Every size the request controls is bounded (:mod:`hatllm_edge.core.limits`); what can be checked
without the model is checked before it is loaded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hatllm_edge.app.models import (
    BundleBuilder,
    cached_bundle,
    default_checkpoint,
    model_kind,
    open_model,
)
from hatllm_edge.app.request import STDIN, STDIN_NAME, RankRequest, read_request
from hatllm_edge.core.data import Catalog
from hatllm_edge.core.errors import InputError
from hatllm_edge.core.formats import (
    CATALOG_FILE,
    CHECKPOINT_META,
    Backend,
    ModelMeta,
    default_quant,
)
from hatllm_edge.core.limits import (
    DEFAULT_K,
    MAX_BEAMS,
    MAX_CANDIDATES,
    MAX_K,
    beam_width,
)
from hatllm_edge.engine.backend import Compute
from hatllm_edge.engine.bundle import read_bundle_meta
from hatllm_edge.engine.cache import cache_root
from hatllm_edge.engine.session import check_device
from hatllm_edge.ranking.ranker import Device, Ranker
from hatllm_edge.ranking.resolve import Resolver, joined, show

log = logging.getLogger("hatllm_edge")


def bundle_dtype(device: Device, dtype: str | None = None) -> str:
    """The float type of a bundle built on first use: fp16 on a GPU (same ranking as fp32,
    1.5x faster there), fp32 on the CPU (whose int8 route reads fp32 graphs)."""
    return dtype or ("fp16" if device == "cuda" else "fp32")


def open_ranker(model: Path | None, device: Device, quant: str | None, backend: str, threads: int | None, progress: bool,
                compute: Compute = "auto", build: BundleBuilder | None = None, dtype: str | None = None,
                cuda_graph: bool = False) -> Ranker:
    """The ranker for ``model`` (default: the shipped checkpoint); a checkpoint run on the
    engine is exported once into the bundle cache by ``build`` (``quant``, default the family's;
    ``dtype``, default :func:`bundle_dtype`). Every option either applies to what runs or is refused."""
    folder = _model_folder(model)
    kind = model_kind(folder)
    if backend == "torch":
        if kind != "checkpoint":
            raise InputError(f"{folder}: --backend torch needs a checkpoint folder, this is an ONNX bundle")
        if quant is not None or dtype is not None:
            raise InputError("--quant and --dtype choose the engine's bundle; --backend torch runs the checkpoint in PyTorch fp32 "
                             "(drop them, or use the onnx backend)")
        return open_model(folder, device, threads, compute=compute, cuda_graph=cuda_graph)
    if kind == "bundle" and (quant is not None or dtype is not None):
        export = read_bundle_meta(folder).export or {}
        raise InputError(f"--quant and --dtype choose the bundle built from a checkpoint; {folder} is a bundle already "
                         f"(quant {export.get('quant', '?')}, dtype {export.get('dtype', '?')}): drop them")
    check_device(device, compute, cuda_graph)  # before a bundle is built for a device this machine lacks
    return open_model(open_bundle(folder, progress, build, quant, bundle_dtype(device, dtype)), device, threads,
                      compute=compute, cuda_graph=cuda_graph)


def _model_folder(model: Path | None) -> Path:
    folder = model or default_checkpoint()
    if not folder.is_dir():
        raise InputError(f"model {folder}: no such folder" + ("" if model else " (the default model ships in models/; pass --model)"))
    return folder


def open_bundle(model: Path | None, progress: bool, build: BundleBuilder | None = None, quant: str | None = None,
                dtype: str = "fp32") -> Path:
    """The bundle the engine runs: ``model`` if it is one, else the checkpoint's cached bundle
    (built by ``build`` on first use, with ``quant`` weights, default the model family's;
    default model: the shipped checkpoint)."""
    folder = _model_folder(model)
    cache_root()  # an unusable $HATLLM_CACHE (bundles built, int8 graphs kept) is refused before anything loads
    if model_kind(folder) == "bundle":
        return folder
    quant = quant or default_quant(ModelMeta.read(folder / CHECKPOINT_META).model_type)
    return cached_bundle(folder, quant, dtype, progress=progress, build=build)


def resolve_request(resolver: Resolver, req: RankRequest, where: str) -> tuple[list[int], list[int] | None]:
    """Catalog indices of the history and the candidates; one error names every entry not in
    the catalog (with its nearest titles) and every candidate given twice."""
    history, problems = resolver.problems(req.history, f"{where}: history")
    candidates = None
    if req.candidates is not None:
        candidates, more = resolver.problems(req.candidates, f"{where}: candidates")
        problems += more
        first: dict[int, int] = {}
        for n, ref in enumerate(req.candidates):
            i = resolver.lookup(ref)
            if i is None:
                continue
            if i in first:
                problems.append(f"{where}: candidates[{n}]: {show(ref)} is the same item as candidates[{first[i]}] "
                                f"({show(req.candidates[first[i]])}); list each candidate once")
            first.setdefault(i, n)
    if problems:
        raise InputError(joined(problems))
    return history, candidates


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
    shortlist: int | None = None  # fused lists from the assistant's N best (0: fused beam search; None: the model's decoding)


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
    shortlist: int | None = None

    def group(self) -> tuple[Any, ...]:
        """Requests with the same group rank together in one engine call; each one's result
        is then what it would be alone (batching never changes a result: tests/test_invariance.py)."""
        if self.candidates is not None:
            return ("candidates", self.assist, self.normalize)
        return ("full-catalog", self.assist, self.k, self.width, self.exclude_history, self.shortlist)


def check_options(opts: RankOptions) -> None:
    """The overrides' bounds, checked before a model is loaded."""
    for name, value, limit, what in (("--k", opts.k, MAX_K, "the list length"), ("--beams", opts.beams, MAX_BEAMS, "the beam width")):
        if value is not None and not 1 <= value <= limit:
            raise InputError(f"{name} is {value}; it must be from 1 to {limit} ({what})")
    if opts.shortlist is not None and not 0 <= opts.shortlist <= MAX_CANDIDATES:
        raise InputError(f"--shortlist is {opts.shortlist}; it must be from 0 (beam search) to {MAX_CANDIDATES}")
    if opts.shortlist and opts.assist is False:
        raise InputError(f"--shortlist {opts.shortlist} draws the list from the assistant, which --no-assist leaves out; drop one of them")


def check_mode(opts: RankOptions, req: RankRequest, where: str) -> None:
    """One request, one mode: a command-line option that only the other mode reads is refused
    rather than ignored (a server's options serve both modes, so it does not call this)."""
    if req.candidates is None and opts.normalize:
        raise InputError(f"{where} ranks the whole catalog; --length-normalise applies to scoring its \"candidates\": drop it")
    if req.candidates is not None:
        given = [flag for flag, value in (("--beams", opts.beams), ("--shortlist", opts.shortlist)) if value is not None]
        if given:
            raise InputError(f"{where} scores its \"candidates\"; {' and '.join(given)} shape the whole-catalog search: drop them")


def prepare(ranker: Ranker, req: RankRequest, where: str, opts: RankOptions) -> Prepared:
    """Resolve a checked request against the model; ``opts`` (the command line's or the
    server's, :func:`check_options`) override the request's k, beams and assist."""
    size = len(ranker.catalog)
    asked = opts.k or req.k
    if asked is not None and asked > size:
        raise InputError(f"k is {asked} but the catalog has {size} items; ask for at most {size}")
    k = asked or min(DEFAULT_K, size)
    history, candidates = resolve_request(ranker.resolver, req, where)
    cut = ranker.prompts.max_history
    if cut and len(history) > cut:
        log.warning("%s: the history has %d items; the model reads only the last %d (its max_history), "
                    "the oldest %d are left out", where, len(history), cut, len(history) - cut)
    return Prepared(req.user_id, tuple(history), None if candidates is None else tuple(candidates), k,
                    beam_width(k, opts.beams or req.beams), req.assist if opts.assist is None else opts.assist,
                    opts.normalize, opts.exclude_history, opts.shortlist)


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
                                  exclude_history=first.exclude_history, shortlist=first.shortlist)
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
    if weight and ranker.decoding.mixture:
        out["mixture"] = True
    if mode == "full-catalog":
        shortlist = ranker.shortlist(p.shortlist) if weight else 0
        out.update({"shortlist": shortlist} if shortlist else {"beams": p.width})
    return {**out, "latency_ms": round(latency, 2), "results": rows}


def run_rank(user: Path, opts: RankOptions, progress: bool = True, build: BundleBuilder | None = None) -> dict[str, Any]:
    """Rank for one request file: full-catalog top-k by beam search, or the request's
    candidates. A list for k <= beams is a prefix of a longer one with the same beams."""
    req = read_request(user)
    where = STDIN_NAME if str(user) == STDIN else str(user)
    check_options(opts)
    check_mode(opts, req, where)
    folder = _model_folder(opts.model)
    if (folder / CATALOG_FILE).is_file():  # unknown titles are reported before the model loads
        resolve_request(Resolver(Catalog.from_jsonl(folder / CATALOG_FILE)), req, where)
    ranker = open_ranker(opts.model, opts.device, opts.quant, opts.backend, opts.threads, progress, opts.compute, build,
                         opts.dtype, opts.cuda_graph)
    return rank_prepared(ranker, [prepare(ranker, req, where, opts)])[0]
