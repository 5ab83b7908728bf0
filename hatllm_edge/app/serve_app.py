"""``hatllm-edge serve``: the engine behind HTTP on Ray Serve.

Each replica loads the bundle once (manifest verified, title tree built) and batches the
requests that arrive together (``@serve.batch``) into :class:`~hatllm_edge.app.serving.RequestBatcher`,
which ranks them off the event loop. The queue in front of the replicas is bounded
(``max_queued_requests``): past it Ray Serve answers 503 at once instead of building a backlog.
Replicas take their CPU count from Ray and give it to ONNX Runtime as threads; with
``device="cuda"`` each one holds a GPU.

Routes (under the application's prefix, ``/rank`` by default): ``POST`` a ``user.json`` body;
``GET .../stats`` the replica's counters; ``GET`` anything else: a health line.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hatllm_edge.ranking.ranker import Device

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
    """The Ray Serve application for ``cfg`` (``serve.run`` it)."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(name="rank", **cfg.deployment_options())
    class RankDeployment:
        def __init__(self) -> None:
            import ray

            from hatllm_edge.app.serving import RequestBatcher

            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            self.batcher = RequestBatcher.open(cfg.bundle, cfg.device, threads=max(1, int(cpus or cfg.threads)))

        @serve.batch(max_batch_size=cfg.max_batch, batch_wait_timeout_s=cfg.batch_wait_s)
        async def rank(self, bodies: list[bytes]) -> list[tuple[int, dict[str, Any]]]:
            return await asyncio.get_running_loop().run_in_executor(None, self.batcher.rank, bodies)

        async def __call__(self, request: Request) -> JSONResponse:
            if request.method == "GET":
                if request.url.path.rstrip("/").endswith("/stats"):
                    return JSONResponse(self.batcher.stats.to_dict())
                return JSONResponse({"status": "ok", "model": str(cfg.bundle), "backend": self.batcher.ranker.label})
            if request.method != "POST":
                return JSONResponse({"error": f"{request.method}: POST a user.json body"}, status_code=405)
            status, body = await self.rank(await request.body())
            return JSONResponse(body, status_code=status)

    return RankDeployment.bind()  # type: ignore[attr-defined]


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


def serve_forever(cfg: ServeConfig, host: str, port: int, address: str | None) -> None:
    """Start (or join, with ``address``) a Ray cluster, run the application on ``host:port``
    and block until interrupted (Ctrl-C, or SIGTERM as a service manager sends it); Serve is
    shut down on the way out."""
    import signal

    import ray
    from ray import serve

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    signal.signal(signal.SIGTERM, stop)  # after ray.init, whose own handler only dumps a trace and dies
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(build_app(cfg), name=APP_NAME, route_prefix=ROUTE, blocking=True)
    finally:
        serve.shutdown()
        ray.shutdown()
