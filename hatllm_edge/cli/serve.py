"""hatllm-edge serve / loadtest: ranking over HTTP on Ray Serve, and a load generator for it."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Optional

import typer

from hatllm_edge.app.models import bundle_builder
from hatllm_edge.cli.common import (
    Device,
    DeviceOpt,
    QuietOpt,
    app,
    fail,
    run,
    usage_error,
    writable_file,
    write_json,
)
from hatllm_edge.core.errors import HatLLMError


@app.command()
def serve(
    model: Annotated[Optional[Path], typer.Option(help="ONNX bundle or checkpoint folder (its int4 bundle, fp16 with --device cuda, is built on first use; default: the shipped model).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP port; POST user.json bodies to http://HOST:PORT/rank.")] = 8000,
    max_batch: Annotated[int, typer.Option(min=1, max=64, help="Requests ranked together by one replica.")] = 8,
    batch_wait_ms: Annotated[float, typer.Option(min=0, help="How long a batch waits to fill after its first request.")] = 10.0,
    replicas: Annotated[str, typer.Option(help="Replicas: a number, or 'auto' (1 to --max-replicas, by queue depth).")] = "1",
    max_replicas: Annotated[int, typer.Option(min=1, help="With --replicas auto: at most this many.")] = 4,
    max_queued: Annotated[int, typer.Option(min=1, help="Requests waiting in front of the replicas; past it the server answers 503.")] = 64,
    threads: Annotated[int, typer.Option(min=1, help="CPUs per replica (Ray reserves them; ONNX Runtime's threads).")] = 2,
    device: DeviceOpt = Device("cpu"),
    address: Annotated[Optional[str], typer.Option(help="Join this Ray cluster (e.g. 10.0.0.5:6379, or 'auto') instead of starting one.")] = None,
    metrics_port: Annotated[int, typer.Option(min=1, max=65535, help="Prometheus metrics of the Ray node this starts, at http://HOST:METRICS_PORT/metrics (with --address, the cluster's own setting applies).")] = 9090,
    quiet: QuietOpt = False,
) -> None:
    """Serve ranking over HTTP on Ray Serve: one loaded model per replica, concurrent requests batched."""
    from hatllm_edge.app.rank import bundle_dtype, open_bundle
    from hatllm_edge.app.serve_app import (
        ROUTE,
        ServeConfig,
        check_resources,
        serve_forever,
    )
    from hatllm_edge.engine.session import check_device

    if replicas != "auto" and not (replicas.isdigit() and int(replicas) >= 1):
        raise usage_error(f"--replicas {replicas!r}: expected a number >= 1 or 'auto'")
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise fail(HatLLMError("serving needs Ray Serve, the serve extra: pip install '.[serve]' in the checkout"))
    count = None if replicas == "auto" else int(replicas)
    run(check_device, device.value)  # before a bundle is built for a device this machine lacks
    if address is None:  # a started cluster's ports and CPUs, before the bundle build too
        run(check_resources, host, port, metrics_port, device.value, threads, count, max_replicas)
    bundle = run(open_bundle, model, not quiet, bundle_builder(), dtype=bundle_dtype(device.value))
    cfg = ServeConfig(bundle=bundle, device=device.value, threads=threads, replicas=count,
                      max_replicas=max_replicas, max_batch=max_batch, batch_wait_s=batch_wait_ms / 1000, max_queued=max_queued)
    metrics = f"metrics: http://{host}:{metrics_port}/metrics; " if address is None and metrics_port else ""  # a joined cluster's own
    typer.echo(f"serving {bundle} at http://{host}:{port}{ROUTE} (schema: {ROUTE}/openapi.json, health: {ROUTE}/health, "
               f"{metrics}Ctrl-C stops)", err=True)
    run(serve_forever, cfg, host, port, address, metrics_port)


@app.command()
def loadtest(
    url: Annotated[str, typer.Argument(help="The server's route, e.g. http://127.0.0.1:8000/rank.")],
    request: Annotated[Optional[list[Path]], typer.Option(help="Request file(s) sent in turn (default: examples/user.json).")] = None,
    n: Annotated[int, typer.Option("-n", min=1, max=100_000, help="Requests to send at most.")] = 100,
    c: Annotated[int, typer.Option("-c", min=1, max=256, help="Requests in flight at once (senders).")] = 4,
    rate: Annotated[Optional[float], typer.Option(min=0.01, help="Open loop: send this many requests per second at fixed intervals, latency counted from when each was due (default: closed loop, each sender waits for its answer).")] = None,
    deadline: Annotated[float, typer.Option(min=0.1, help="Seconds after which nothing is sent or waited on.")] = 60.0,
    allow_remote: Annotated[bool, typer.Option("--allow-remote", help="Allow a URL that is not a loopback address.")] = False,
    out: Annotated[Optional[Path], typer.Option(callback=writable_file, help="JSON file for the figures.")] = None,
) -> None:
    """A bounded load test of 'hatllm-edge serve', closed or open loop: throughput, p50/p95/p99, errors."""
    from hatllm_edge.app.loadtest import LoadConfig, read_bodies, run_load, summary_line

    paths = request or [Path(str(files("hatllm_edge.examples") / "user.json"))]
    cfg = LoadConfig(url=url, bodies=run(read_bodies, paths), requests=n, concurrency=c, deadline_s=deadline,
                     allow_remote=allow_remote, rate=rate)
    result = run(run_load, cfg)
    write_json(out, result)
    typer.echo(summary_line(result), err=True)
    typer.echo(json.dumps(result))
    if result["errors"]:
        raise typer.Exit(1)
