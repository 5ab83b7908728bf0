"""``hatllm-edge serve``: the engine behind HTTP on Ray Serve.

Each replica loads the bundle once (manifest verified, title tree built) and batches the
requests that arrive together (``@serve.batch``) into :class:`~hatllm_edge.app.serving.RequestBatcher`,
which ranks them off the event loop. The queue in front of the replicas is bounded
(``max_queued_requests``): past it Ray Serve answers 503 at once instead of building a backlog.
Replicas take their CPU count from Ray and give it to ONNX Runtime as threads; with
``device="cuda"`` each one holds a GPU.

Routes (under the application's prefix, ``/rank`` by default): ``POST /rank`` a request (the
schema: ``GET /rank/openapi.json``, readable at ``/rank/docs``); ``GET /rank/health`` runs a real
tiny ranking on a replica; ``GET /rank/stats`` its counters. Prometheus metrics (Ray Serve's:
requests, latency histograms, batch sizes, queue length, HTTP errors such as 503; and this
app's ``hatllm_requests`` by status and ``hatllm_rank_latency_ms``) at
``http://HOST:METRICS_PORT/metrics`` of the Ray node.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hatllm_edge.ranking.ranker import Device

log = logging.getLogger("hatllm_edge")

ROUTE = "/rank"
APP_NAME = "hatllm-edge"


@dataclass(frozen=True)
class ServeConfig:
    """How the deployment runs; every field maps to one ``hatllm-edge serve`` option."""

    bundle: Path
    device: Device = "cpu"
    threads: int = 2  # CPUs per replica: Ray reserves them, ONNX Runtime uses them
    replicas: int | None = 1  # None: autoscaled from 1 to max_replicas by queue depth
    max_replicas: int = 4
    max_batch: int = 8
    batch_wait_s: float = 0.01  # how long a batch waits to fill after its first request
    max_queued: int = 64  # requests waiting in front of the replicas; more are answered 503

    def deployment_options(self) -> dict[str, Any]:
        scaling: dict[str, Any] = ({"num_replicas": self.replicas} if self.replicas is not None else
                                   {"autoscaling_config": {"min_replicas": 1, "max_replicas": self.max_replicas,
                                                           "target_ongoing_requests": self.max_batch,
                                                           "upscale_delay_s": 3, "downscale_delay_s": 30}})
        return {**scaling, "max_ongoing_requests": 2 * self.max_batch, "max_queued_requests": self.max_queued,
                "ray_actor_options": {"num_cpus": self.threads, "num_gpus": 1 if self.device == "cuda" else 0}}


def build_app(cfg: ServeConfig) -> Any:
    """The Ray Serve application for ``cfg`` (``serve.run`` it): :mod:`hatllm_edge.app.serve_routes`."""
    from hatllm_edge.app.serve_routes import rank_deployment

    return rank_deployment(cfg)


def app_builder(args: dict[str, Any]) -> Any:
    """The application from a Ray Serve config file's ``args`` (``serve deploy serve_config.yaml``):
    ``bundle`` (required), and any other :class:`ServeConfig` field; ``replicas: auto`` autoscales."""
    if "bundle" not in args:
        raise ValueError("serve_config.yaml: the application's args need 'bundle' (an exported bundle folder)")
    known = set(ServeConfig.__dataclass_fields__)
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"serve_config.yaml: unknown args {unknown}; allowed: {sorted(known)}")
    fields = {**args, "bundle": Path(args["bundle"])}
    if fields.get("replicas") == "auto":
        fields["replicas"] = None
    return build_app(ServeConfig(**fields))


# Ray Serve's start-up checks, sized for a busy 2-core machine: its defaults (5 s for the HTTP
# proxy to report ready, 10 s per health check) kill the proxy there ("ProxyActor ... killed
# by ray.kill") while the replicas load. A value already in the environment wins.
SLOW_MACHINE_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}


def check_resources(host: str, port: int, metrics_port: int | None, device: str, threads: int,
                    replicas: int | None, max_replicas: int) -> None:
    """What would make Ray fail with an unreadable error and needs no model, checked before one is
    built: a port in use, more CPUs asked than the machine has (``replicas`` None: autoscaled,
    where only the replicas that fit ever start, which is said as a warning)."""
    from hatllm_edge.core.errors import InputError

    for what, number in (("--port", port), ("--metrics-port", metrics_port)):
        if number is None:
            continue
        with socket.socket() as probe_socket:
            try:
                probe_socket.bind((host if what == "--port" else "0.0.0.0", number))
            except OSError as e:
                raise InputError(f"{what} {number} is in use or not allowed on {host} ({e.strerror}): stop what holds it "
                                 f"(another 'hatllm-edge serve'?) or pass another {what}") from None
    cpus = os.cpu_count() or 1
    if device != "cpu":
        return
    if (replicas or 1) * threads > cpus:
        raise InputError(f"{replicas or 1} replica(s) x --threads {threads} need {(replicas or 1) * threads} CPUs; this machine "
                         f"has {cpus}: lower --threads or --replicas")
    if replicas is None and max_replicas * threads > cpus:
        log.warning("--replicas auto: %d replicas x --threads %d would need %d CPUs, this machine has %d; at most %d "
                    "replica(s) will start (lower --max-replicas to match)", max_replicas, threads, max_replicas * threads,
                    cpus, cpus // threads)


def check_memory(bundle: Path) -> None:
    """Enough free memory for Ray and one loaded replica of ``bundle``, else a message saying so
    (exit code 1: the machine, not the command, has to change)."""
    from hatllm_edge.core.errors import HatLLMError
    from hatllm_edge.core.machine import available_mib

    available = available_mib()
    bundle_mib = sum(f.stat().st_size for f in Path(bundle).rglob("*") if f.is_file()) / 2**20
    need = 1024 + 4 * bundle_mib  # Ray's own processes, and a replica's session (the int8 route expands the weights)
    if available is not None and available < need:
        raise HatLLMError(f"{available:,.0f} MiB of memory is free; Ray and one replica of this model need about {need:,.0f} MiB: "
                          "free some (a training run?) before serving")


def serve_forever(cfg: ServeConfig, host: str, port: int, address: str | None, metrics_port: int | None = None) -> None:
    """Start (or join, with ``address``) a Ray cluster, run the application on ``host:port``
    and block until stopped: SIGTERM, as a service manager sends it, returns normally (exit code
    0), Ctrl-C ends as interrupted (130); Serve is shut down on the way out. ``metrics_port``: where a started cluster exports Prometheus
    metrics. A failure to start is one message saying what to change."""
    import signal

    import ray
    from ray import serve

    from hatllm_edge.core.errors import HatLLMError

    class Terminated(Exception):
        """SIGTERM: the service manager's normal stop, so the process ends with exit code 0."""

    def stop(signum: int, frame: Any) -> None:
        raise Terminated

    if address is None:  # checked again: the bundle may have taken minutes to build
        check_resources(host, port, metrics_port, cfg.device, cfg.threads, cfg.replicas, cfg.max_replicas)
        check_memory(cfg.bundle)
    for key, value in SLOW_MACHINE_ENV.items():
        os.environ.setdefault(key, value)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 **({"_metrics_export_port": metrics_port} if address is None and metrics_port else {}))
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise HatLLMError(f"could not start {where}: {' '.join(str(e).split())[:300]}"
                          + (" (is it running? 'ray status' says)" if address else " (free memory and /tmp space; see 'ray status')")) from None
    previous = signal.signal(signal.SIGTERM, stop)  # after ray.init, whose own handler only dumps a trace and dies
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(cfg), name=APP_NAME, route_prefix=ROUTE, blocking=True)
    except Terminated:
        return
    except (KeyboardInterrupt, HatLLMError):  # Ctrl-C ends as interrupted (exit code 130)
        raise
    except Exception as e:  # Ray's actor errors: say which part failed and the usual causes
        text = " ".join(str(e).split())
        part = "the HTTP proxy" if "Proxy" in text else "a replica" if "rank" in text.lower() else "Ray Serve"
        raise HatLLMError(f"{part} failed to start ({type(e).__name__}: {text[:240]}): usual causes are too little free "
                          f"memory, --port {port} taken by another process, or a machine too busy for Ray's start-up checks "
                          f"(raise RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S, now {os.environ['RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S']} s)") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        serve.shutdown()
        ray.shutdown()
