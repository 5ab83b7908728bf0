"""``hatllm-edge loadtest``: a bounded HTTP load test of ``hatllm-edge serve``.

At most ``n`` requests, ``concurrency`` in flight, none started after ``deadline`` seconds and
none waited on past it; loopback addresses only unless allowed. Closed loop (default): each
sender sends its next request when the last one is answered, which measures throughput but,
when the server slows, sends less and hides the wait (coordinated omission). Open loop
(``rate``): request i is due at i / rate seconds, and its latency counts from then, so a
backlog shows in the percentiles; ``late_starts`` counts requests no sender was free for. Reports throughput, latency
percentiles and every failure by its status, so a run with errors is never read as a clean one.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence
from urllib.parse import urlsplit

import numpy as np

from hatllm_edge.core.errors import InputError

LATE_S = 0.01  # a request that starts this much after it was due counts as late


@dataclass(frozen=True)
class LoadConfig:
    url: str
    bodies: tuple[bytes, ...]  # sent in turn
    requests: int = 100
    concurrency: int = 4
    deadline_s: float = 60.0
    allow_remote: bool = False
    rate: float | None = None  # open loop: requests per second at fixed intervals (None: closed loop)


def check_target(url: str, allow_remote: bool) -> None:
    """An http(s) URL whose host resolves to loopback only, unless ``allow_remote``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"{url!r}: expected an http:// or https:// URL, e.g. http://127.0.0.1:8000/rank")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InputError(f"{url!r}: the port must be a number from 0 to 65535") from None
    if allow_remote:
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(parts.hostname, port)}
    except socket.gaierror as e:
        raise InputError(f"{url}: cannot resolve {parts.hostname!r} ({e.strerror})") from None
    remote = sorted(a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback)
    if remote:
        raise InputError(f"{url}: {parts.hostname} is not a loopback address ({', '.join(remote)}); "
                         "pass --allow-remote to load a server you run elsewhere")


def run_load(cfg: LoadConfig) -> dict[str, Any]:
    """Send the requests and measure; the summary holds every latency's percentiles and the
    failures counted by status ("timeout" and "connection" for those without one)."""
    check_target(cfg.url, cfg.allow_remote)
    if not cfg.bodies:
        raise InputError("no request bodies to send")
    start = time.perf_counter()
    stop_at = start + cfg.deadline_s
    latencies: list[float] = []
    failures: dict[str, int] = {}
    sent = 0
    lock = threading.Lock()

    late = 0

    def one(n: int) -> None:
        nonlocal sent, late
        intended = start + n / cfg.rate if cfg.rate else None
        if intended is not None and intended > time.perf_counter():
            time.sleep(intended - time.perf_counter())
        left = stop_at - time.perf_counter()
        if left <= 0:
            return
        with lock:
            sent += 1
        request = urllib.request.Request(cfg.url, data=cfg.bodies[n % len(cfg.bodies)], method="POST",
                                         headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        if intended is not None:  # open loop: latency from when the request was due, not when a sender got free
            with lock:
                late += t0 - intended > LATE_S
            t0 = intended
        try:
            with urllib.request.urlopen(request, timeout=left) as response:
                response.read()
            outcome = None
        except urllib.error.HTTPError as e:
            outcome = str(e.code)
        except (TimeoutError, socket.timeout):
            outcome = "timeout"
        except (urllib.error.URLError, ConnectionError, OSError):
            outcome = "connection"
        with lock:
            if outcome is None:
                latencies.append(time.perf_counter() - t0)
            else:
                failures[outcome] = failures.get(outcome, 0) + 1

    with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
        list(pool.map(one, range(cfg.requests)))
    wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    pct = {f"p{q}_ms": round(float(np.percentile(ms, q)), 1) if len(ms) else None for q in (50, 95, 99)}
    mode = {"mode": f"open loop, {cfg.rate:g} requests/s", "rate": cfg.rate, "late_starts": late} if cfg.rate else {"mode": "closed loop"}
    return {"url": cfg.url, **mode, "concurrency": cfg.concurrency, "asked": cfg.requests, "sent": sent, "ok": len(latencies),
            "errors": sum(failures.values()), "failures": failures, "wall_s": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 2) if wall > 0 else None, **pct,
            "mean_ms": round(float(ms.mean()), 1) if len(ms) else None}


def summary_line(result: dict[str, Any]) -> str:
    p = lambda k: "-" if result[k] is None else f"{result[k]:.0f}"  # noqa: E731
    how = result["mode"] if result.get("rate") else f"concurrency {result['concurrency']}"
    late = f"; {result['late_starts']} sent late (raise -c)" if result.get("late_starts") else ""
    return (f"{result['ok']}/{result['sent']} ok, {how}: {result['requests_per_s']} req/s, "
            f"p50 {p('p50_ms')} ms, p95 {p('p95_ms')} ms, p99 {p('p99_ms')} ms; errors {result['errors']} {result['failures'] or ''}{late}")


def read_bodies(paths: Sequence[Any]) -> tuple[bytes, ...]:
    """The request files' bytes, each checked like ``hatllm-edge rank`` would check it."""
    from hatllm_edge.app.request import read_request

    for path in paths:
        read_request(path)
    return tuple(path.read_bytes() for path in paths)
