"""Where an int8 route's graph comes from: the stored graph expanded to int8 at load
(:func:`hatllm_edge.engine.int8.int8_compute`, seconds), or that expansion kept in the cache by
the bundle's verified content (:class:`hatllm_edge.engine.cache.Int8Cache`)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from hatllm_edge.core.errors import InputError
from hatllm_edge.core.formats import INT8_REVISION, META_MODEL_TYPE, META_QUANT
from hatllm_edge.engine.backend import Compute, resolve_compute
from hatllm_edge.engine.bundle import first_line
from hatllm_edge.engine.cache import Int8Cache, cache_root, require_writable

log = logging.getLogger("hatllm_edge")


def int8_source(path: Path, compute: Compute,
                cache_key: str | None) -> tuple[str | bytes, Compute, tuple[Int8Cache, str] | None]:
    """The graph to run for an int8 route ("auto" resolved by the stored graph's
    ``hatllm.quant``), the route taken, and the cache entry it was read from (None when
    expanded now). The expansion costs seconds at every load, so with a ``cache_key`` (the
    bundle's verified content) it is kept under :func:`cache_root`, with its own sha256,
    and read back from there next time only if it still matches; one process expands
    while others wait for it (a file lock), and the cache keeps the most recently used
    few."""
    if cache_key is None:
        data, compute = expand_stored(path, compute)
        return data, compute, None
    cache = Int8Cache(cache_root())
    if compute != "auto":  # "auto" must first see whether the graph is quantised
        hit = cache.read(_key(cache_key, compute))
        if hit is not None:
            return hit, compute, (cache, _key(cache_key, compute))
    try:
        require_writable(cache.dir)
    except InputError as e:
        log.warning("%s; the int8 expansion (seconds) runs at every load", e)
        data, compute = expand_stored(path, compute)
        return data, compute, None
    with cache.lock():
        if compute != "auto":
            hit = cache.read(_key(cache_key, compute))  # another process may have written it while we waited
            if hit is not None:
                return hit, compute, (cache, _key(cache_key, compute))
        data, compute = expand_stored(path, compute)
        if isinstance(data, bytes):
            try:
                cache.write(_key(cache_key, compute), data)
            except OSError as e:
                log.warning("could not keep the int8 graph in %s (%s); the expansion runs again next time",
                            cache.dir, e.strerror or e)
    return data, compute, None

def _key(cache_key: str, compute: Compute) -> str:
    """The cache entry of a route's graph: the bundle's content, the route, the rewrite's revision."""
    return hashlib.sha256(f"{cache_key}-{compute}-int8-revision-{INT8_REVISION}".encode()).hexdigest()[:16]


def expand_stored(path: Path, compute: Compute) -> tuple[str | bytes, Compute]:
    """The stored graph rewritten for its int8 route (bytes): expanded to int8
    (:func:`~hatllm_edge.engine.int8.int8_compute`, per token or per tensor) or put on ONNX
    Runtime's block-wise int8 kernels (:func:`~hatllm_edge.engine.int8.block_compute`); its path
    when "auto" finds it is not quantised."""
    import onnx
    from google.protobuf.message import DecodeError

    from hatllm_edge.engine.int8 import block_compute, int8_compute

    try:
        stored = onnx.load(str(path))
    except (DecodeError, ValueError, OSError) as e:
        raise InputError(f"ONNX model {path} is not a readable ONNX graph ({type(e).__name__}: {first_line(e)}); "
                         "re-export the bundle") from None
    props = {p.key: p.value for p in stored.metadata_props}
    compute = resolve_compute(compute, "cpu", props.get(META_QUANT, "none"), props.get(META_MODEL_TYPE))
    if compute == "native":
        return str(path), compute
    if compute == "int8-block":
        blocked, changed = block_compute(stored)
        if not changed:
            raise InputError(f"compute int8-block runs MatMulNBits weights (an int4 or int8 bundle); ONNX model {path} has "
                             f"{props.get(META_QUANT, 'no recorded')} weights: use --compute int8 or native")
        return blocked.SerializeToString(), compute
    return int8_compute(stored, "tensor" if compute == "int8-tensor" else "row")[0].SerializeToString(), compute
