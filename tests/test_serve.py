"""The server on a real local Ray cluster (loopback only, torn down after): the HTTP answer is
``hatllm-edge rank``'s, bad input is a 400 with the message, concurrent requests are ranked in
fewer engine calls than requests with each result unchanged, a full queue answers 503, and the
load test counts what it sent."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_bundle
from typer.testing import CliRunner

from hatllm_edge.app.loadtest import LoadConfig, check_target, run_load
from hatllm_edge.cli import app
from hatllm_edge.core.errors import InputError

ray = pytest.importorskip("ray", reason="the serve extra (pip install '.[serve]')")

TITLES = ["Alpha (1990)", "Beta (1991)", "Gamma, The (1992)", "Delta (1993)", "Epsilon (1994)", "Zeta (1995)"]
IDS = [f"i{n}" for n in range(1, len(TITLES) + 1)]
REQUESTS = [{"history": IDS[: 1 + n % 4], "k": 3, "user_id": n} for n in range(6)] + [
    {"history": ["i2", "i3"], "candidates": ["i1", "i4", "i6"], "user_id": "c1"},
    {"history": ["i5"], "candidates": ["i2", "i3"], "user_id": "c2"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bundle(tokenizer_json: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("serve"), tokenizer_json, TITLES, IDS, 5)


@pytest.fixture(scope="module")
def cluster(bundle: Path) -> Any:
    """Two applications on a local one-node Ray cluster, one CPU each, with a long batch wait so
    that concurrent requests meet in one batch: ``/rank`` with the default queue, ``/burst`` with
    a queue of 4 that a burst overflows. They are apart because Ray Serve counts requests still
    being routed as queued, so 8 simultaneous requests can overflow a queue of 4 at random."""
    from ray import serve

    from hatllm_edge.app.serve_app import (
        APP_NAME,
        ROUTE,
        SLOW_MACHINE_ENV,
        ServeConfig,
        build_app,
    )

    port, metrics_port = free_port(), free_port()
    for key, value in SLOW_MACHINE_ENV.items():  # as 'hatllm-edge serve' starts Ray: CI machines can be busy
        os.environ.setdefault(key, value)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False, _metrics_export_port=metrics_port)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = ServeConfig(bundle=bundle, threads=1, max_batch=8, batch_wait_s=0.5)
        serve.run(build_app(cfg), name=APP_NAME, route_prefix=ROUTE)
        serve.run(build_app(dataclasses.replace(cfg, max_queued=4)), name="burst", route_prefix="/burst")
        yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def server(cluster: tuple[str, str]) -> str:
    return cluster[0] + "/rank"


def post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        text = e.read()
        return e.code, json.loads(text) if text.startswith(b"{") else {"raw": text.decode(errors="replace")}


def stats(url: str) -> dict[str, int]:
    with urllib.request.urlopen(url + "/stats", timeout=30) as response:
        return json.loads(response.read())


def unlatency(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "latency_ms"}


def rank_cli(bundle: Path, request: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "user.json"
    path.write_text(json.dumps(request))
    result = CliRunner().invoke(app, ["rank", str(path), "--model", str(bundle), "-q", "--threads", "1"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_answer_is_ranks_and_bad_input_is_a_400(server: str, bundle: Path, tmp_path: Path) -> None:
    for request in (REQUESTS[3], REQUESTS[6]):
        status, body = post(server, json.dumps(request).encode())
        assert status == 200 and unlatency(body) == unlatency(rank_cli(bundle, request, tmp_path))
    status, body = post(server, b'{"history": ["i1", "Omega (2000)"]}')
    assert status == 400 and "history[1]: 'Omega (2000)' is neither an item id nor an exact title" in body["error"]
    status, body = post(server, b'{"history": []}')
    assert status == 400 and "field 'history' must be a non-empty list" in body["error"]


def test_concurrent_requests_share_engine_calls_and_keep_their_results(server: str) -> None:
    alone = [post(server, json.dumps(r).encode()) for r in REQUESTS]
    before = stats(server)
    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        together = list(pool.map(lambda r: post(server, json.dumps(r).encode()), REQUESTS))
    after = stats(server)
    assert [status for status, _ in together] == [200] * len(REQUESTS), together
    assert [unlatency(b) for _, b in together] == [unlatency(b) for _, b in alone]
    assert after["requests"] - before["requests"] == len(REQUESTS)
    assert after["engine_calls"] - before["engine_calls"] < len(REQUESTS)


def test_a_burst_past_the_queue_bound_is_answered_503_not_queued(cluster: tuple[str, str]) -> None:
    # far more than the replica holds (max_ongoing 2 x max_batch 8 = 16) plus the queue's 4: the
    # rest must come back 503 at once; the first 4 always fit in the queue (fewer than 16 may be
    # answered 200, since requests being routed count as queued)
    body = json.dumps(REQUESTS[0]).encode()
    with ThreadPoolExecutor(48) as pool:
        statuses = [s for s, _ in pool.map(lambda _: post(cluster[0] + "/burst", body), range(48))]
    assert set(statuses) <= {200, 503} and statuses.count(503) > 0 and statuses.count(200) >= 4


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            text = response.read()
            return response.status, json.loads(text) if response.headers.get_content_type() == "application/json" else text.decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def test_the_schema_health_and_metrics_are_served(cluster: tuple[str, str], server: str) -> None:
    """OpenAPI at the usual route with the request model as the POST body; a health route that
    ranks for real; Prometheus metrics of Ray Serve and of this app on the node's metrics port."""
    status, doc = get(server + "/openapi.json")
    assert status == 200 and doc["info"]["title"] == "hatllm-edge"
    request = doc["components"]["schemas"]["RankRequest"]
    assert {"history", "candidates", "k", "beams", "user_id", "assist"} == set(request["properties"])
    assert request["required"] == ["history"] and request["additionalProperties"] is False
    body = doc["paths"]["/"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/RankRequest"} and "400" in doc["paths"]["/"]["post"]["responses"]
    status, health = get(server + "/health")
    assert status == 200 and health["status"] == "ok" and health["probe_ms"] > 0
    post(server, json.dumps(REQUESTS[0]).encode())
    post(server, b'{"history": []}')
    deadline, text = time.time() + 90, ""
    while time.time() < deadline:  # Ray exports metrics every few seconds
        status, text = get(cluster[1])
        if status == 200 and 'hatllm_requests' in text and 'status="400"' in text and "serve_num_http_requests" in text:
            break
        time.sleep(3)
    assert 'hatllm_requests' in text and 'status="400"' in text and "hatllm_rank_latency_ms_bucket" in text
    assert "serve_num_http_requests" in text and "serve_deployment_queued_queries" in text


def test_a_server_that_cannot_start_says_why(bundle: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from hatllm_edge.app import serve_app
    from hatllm_edge.core.errors import HatLLMError

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(InputError, match=f"--port {port} is in use"):
            serve_app.check_resources("127.0.0.1", port, None, "cpu", 1, 1, 1)
        # from the command line, before the model's bundle is built (minutes on first use)
        monkeypatch.setattr("hatllm_edge.app.rank.open_bundle", lambda *a, **k: pytest.fail("built the bundle first"))
        result = CliRunner().invoke(app, ["serve", "--port", str(port), "--host", "127.0.0.1"])
        assert result.exit_code == 2 and f"--port {port} is in use" in result.stderr
    with pytest.raises(InputError, match="CPUs; this machine has"):
        serve_app.check_resources("127.0.0.1", free_port(), None, "cpu", 1, 4096, 4096)
    with caplog.at_level("WARNING", logger="hatllm_edge"):  # autoscaled: only the replicas that fit start
        serve_app.check_resources("127.0.0.1", free_port(), None, "cpu", 1, None, 4096)
    assert "replica(s) will start" in caplog.text
    monkeypatch.setattr("hatllm_edge.core.machine.available_mib", lambda: 10.0)
    with pytest.raises(HatLLMError, match="MiB of memory is free") as e:
        serve_app.check_memory(bundle)
    assert e.value.exit_code == 1


def test_loadtest_counts_what_it_sent(server: str) -> None:
    result = run_load(LoadConfig(url=server, bodies=(json.dumps(REQUESTS[0]).encode(),), requests=6, concurrency=2, deadline_s=120))
    assert result["sent"] == result["ok"] == 6 and result["errors"] == 0 and result["p50_ms"] > 0


def test_an_open_loop_counts_latency_from_when_each_request_was_due(server: str) -> None:
    """At a fixed rate with one sender, requests queue on the client whenever one answer takes
    longer than the interval: their latency then includes that wait (no coordinated omission)."""
    body = (json.dumps(REQUESTS[0]).encode(),)
    result = run_load(LoadConfig(url=server, bodies=body, requests=6, concurrency=1, deadline_s=120, rate=50.0))
    assert result["mode"] == "open loop, 50 requests/s" and result["sent"] == result["ok"] == 6
    closed = run_load(LoadConfig(url=server, bodies=body, requests=6, concurrency=1, deadline_s=120))
    assert closed["mode"] == "closed loop" and "late_starts" not in closed
    # each answer takes longer than the 20 ms interval, so later requests were due long before
    # they could start: the open loop's p99 exceeds the closed loop's
    assert result["late_starts"] > 0 and result["p99_ms"] > closed["p99_ms"]


def test_loadtest_stays_on_loopback_unless_told() -> None:
    with pytest.raises(InputError, match="not a loopback address"):
        check_target("http://192.0.2.1:8000/rank", allow_remote=False)
    with pytest.raises(InputError, match="expected an http"):
        check_target("ftp://127.0.0.1/rank", allow_remote=False)
    check_target("http://localhost:8000/rank", allow_remote=False)


def test_the_cluster_config_builds_the_same_application(bundle: Path) -> None:
    """serve_config.yaml's args are ServeConfig's: the example file names only known ones."""
    import yaml

    from hatllm_edge.app.serve_app import ServeConfig, app_builder

    config = yaml.safe_load((Path(__file__).resolve().parent.parent / "serve_config.yaml").read_text())
    args = config["applications"][0]["args"]
    assert set(args) <= set(ServeConfig.__dataclass_fields__)
    assert app_builder({**args, "bundle": str(bundle)}) is not None
    with pytest.raises(ValueError, match="unknown args \\['colour'\\]"):
        app_builder({"bundle": str(bundle), "colour": "red"})


def test_sigterm_is_a_normal_stop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A service manager's SIGTERM while serving ends serve_forever normally (the command exits 0,
    not as interrupted), with Serve and Ray shut down and the previous SIGTERM handler back."""
    import signal
    import sys
    import types

    import hatllm_edge.app.serve_app as serve_app

    calls: list[str] = []
    fake_serve = types.SimpleNamespace(
        start=lambda **k: calls.append("start"),
        run=lambda *a, **k: (calls.append("run"), os.kill(os.getpid(), signal.SIGTERM), time.sleep(5), calls.append("ran on")),
        shutdown=lambda: calls.append("serve down"))
    fake_ray = types.SimpleNamespace(init=lambda **k: calls.append("init"), shutdown=lambda: calls.append("ray down"), serve=fake_serve)
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    monkeypatch.setitem(sys.modules, "ray.serve", fake_serve)
    monkeypatch.setattr(serve_app, "build_app", lambda cfg: None)
    before = signal.getsignal(signal.SIGTERM)
    serve_app.serve_forever(serve_app.ServeConfig(bundle=tmp_path), "127.0.0.1", free_port(), address="127.0.0.1:1")
    assert calls == ["init", "start", "run", "serve down", "ray down"]
    assert signal.getsignal(signal.SIGTERM) is before
