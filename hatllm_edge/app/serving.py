"""The serving core, without Ray: request bodies in, (HTTP status, JSON) out, ranked in as few
engine calls as their groups allow (:func:`~hatllm_edge.app.rank.rank_prepared`).

A request body is checked exactly like a ``user.json`` file (same rules, same messages); a bad
one is answered 400 alone and never holds up the others in its batch. The server
(:mod:`hatllm_edge.app.serve_app`) wraps this in a Ray Serve deployment; it is kept apart so that
the batching rules are tested, and usable, without Ray.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from hatllm_edge.app.models import model_kind, open_model
from hatllm_edge.app.rank import (
    Prepared,
    RankOptions,
    check_options,
    prepare,
    rank_prepared,
)
from hatllm_edge.app.request import parse_request
from hatllm_edge.core.errors import InputError
from hatllm_edge.engine.backend import Compute
from hatllm_edge.ranking.ranker import Device, Ranker

Answer = tuple[int, dict[str, Any]]  # (HTTP status, JSON body)


@dataclass
class Stats:
    """What a replica has done since it started: requests answered, batches taken, engine
    calls made (one per group of a batch), and requests refused as bad input."""

    requests: int = 0
    batches: int = 0
    engine_calls: int = 0
    bad_requests: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class RequestBatcher:
    """One loaded model answering batches of request bodies; thread-safe (one engine call at a
    time per model, as ONNX Runtime's session runs its own threads)."""

    def __init__(self, ranker: Ranker, opts: RankOptions | None = None) -> None:
        self.ranker = ranker
        self.opts = opts or RankOptions()
        check_options(self.opts)
        self.stats = Stats()
        self._lock = threading.Lock()
        _ = ranker.trie  # built before the first request, not during it

    @classmethod
    def open(cls, bundle: Path, device: Device = "cpu", threads: int | None = None, compute: Compute = "auto",
             opts: RankOptions | None = None) -> "RequestBatcher":
        """A batcher over an exported bundle (its manifest verified): the engine, never PyTorch."""
        if model_kind(Path(bundle)) != "bundle":
            raise InputError(f"{bundle}: serving runs an exported bundle (hatllm-edge export, or the cached one "
                             "'hatllm-edge serve' builds from a checkpoint)")
        return cls(open_model(Path(bundle), device, threads, compute=compute), opts)

    def rank(self, bodies: Sequence[bytes]) -> list[Answer]:
        """Answers in request order: 200 and ``rank``'s JSON, or 400 and ``{"error": message}``."""
        answers: list[Answer | None] = [None] * len(bodies)
        good: list[tuple[int, Prepared]] = []
        for n, body in enumerate(bodies):
            try:
                good.append((n, prepare(self.ranker, parse_request(body, "request"), "request", self.opts)))
            except InputError as e:
                answers[n] = (400, {"error": str(e)})
        with self._lock:
            results = rank_prepared(self.ranker, [p for _, p in good]) if good else []
            self.stats.batches += 1
            self.stats.engine_calls += len({p.group() for _, p in good})
            self.stats.requests += len(bodies)
            self.stats.bad_requests += len(bodies) - len(good)
        for (n, _), result in zip(good, results):
            answers[n] = (200, result)
        return answers  # type: ignore[return-value]
