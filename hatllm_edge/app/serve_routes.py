"""The HTTP routes of ``hatllm-edge serve``: a FastAPI ingress on a Ray Serve deployment.

Kept apart from :mod:`hatllm_edge.app.serve_app` (configuration and start-up) because FastAPI
reads handler annotations at run time, so this module imports FastAPI and Ray at its top and
does without postponed annotations; it is imported only when a server is built.
"""

import asyncio
import json
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import metrics

from hatllm_edge import __version__
from hatllm_edge.app.request import RankRequest
from hatllm_edge.app.serve_app import ServeConfig


class _PrefixRoot:
    """ASGI: a request for the application's prefix itself (``/rank``) is routed as its root
    (``/rank/``), instead of the 307 redirect Starlette answers, which clients do not follow
    for a POST."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("root_path") and scope["path"] == scope["root_path"]:
            scope = {**scope, "path": scope["path"] + "/", "raw_path": scope.get("raw_path", b"") + b"/"}
        await self.app(scope, receive, send)


def probe(batcher: Any) -> bytes:
    """A real, tiny request for the health check: the catalog's first item scored as the only
    candidate after its second (one engine pass; what every request runs through)."""
    titles = batcher.ranker.catalog.item_ids
    return json.dumps({"history": [titles[min(1, len(titles) - 1)]], "candidates": [titles[0]], "assist": False}).encode()


def rank_deployment(cfg: ServeConfig) -> Any:
    """The Ray Serve application for ``cfg`` (``serve.run`` it): a FastAPI ingress, so the
    request schema is served at ``{ROUTE}/openapi.json`` (``{ROUTE}/docs`` to read it)."""
    api = FastAPI(title="hatllm-edge", version=__version__, description=(
        "Rank a catalog for one user with an LLM recommender (HatLLM) on ONNX Runtime. POST a request; "
        "GET health runs a real ranking on the replica; GET stats reads its counters."))
    schema = RankRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    api.openapi_schema = None

    def openapi() -> dict[str, Any]:  # the request model as the POST body's schema (the body is read raw, see rank)
        if api.openapi_schema is None:
            doc = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
            doc.setdefault("components", {}).setdefault("schemas", {})["RankRequest"] = schema
            api.openapi_schema = doc
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]
    api.add_middleware(_PrefixRoot)  # POST /rank as well as /rank/ (no redirect a POST would not follow)
    body_doc = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/RankRequest"}}}}}
    error = {"description": "Bad request: every problem of it, in one message", "content": {"application/json": {
        "example": {"error": "request: history[1]: 'Star Wars' is neither an item id nor an exact title in the catalog "
                             "(did you mean 'Star Wars (1977)'?)"}}}}

    @serve.deployment(name="rank", health_check_period_s=30, health_check_timeout_s=60, **cfg.deployment_options())
    @serve.ingress(api)
    class RankDeployment:
        def __init__(self) -> None:
            import ray

            from hatllm_edge.app.serving import RequestBatcher

            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            self.batcher = RequestBatcher.open(cfg.bundle, cfg.device, threads=max(1, int(cpus or cfg.threads)))
            self.probe = probe(self.batcher)
            self.answered = metrics.Counter("hatllm_requests", description="Requests answered, by HTTP status.",
                                            tag_keys=("status",))
            self.latency = metrics.Histogram("hatllm_rank_latency_ms", description="Ranking time of a request's batch.",
                                             boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000])

        @serve.batch(max_batch_size=cfg.max_batch, batch_wait_timeout_s=cfg.batch_wait_s)
        async def rank(self, bodies: list[bytes]) -> list[tuple[int, dict[str, Any]]]:
            answers = await asyncio.get_running_loop().run_in_executor(None, self.batcher.rank, bodies)
            for status, body in answers:
                self.answered.inc(tags={"status": str(status)})
                if status == 200:
                    self.latency.observe(body["latency_ms"])
            return answers

        @api.post("/", openapi_extra=body_doc, responses={400: error, 503: {"description": "The queue is full; retry later"}},
                  summary="Rank for one user: full-catalog top-k, or the given candidates")
        async def post(self, request: Request) -> JSONResponse:
            # read raw, not as a FastAPI body: a bad request gets every problem in this tool's
            # words, as 400 (not FastAPI's 422), exactly as `hatllm-edge rank` would say it
            status, body = await self.rank(await request.body())
            return JSONResponse(body, status_code=status)

        @api.get("/health", summary="A real tiny ranking on this replica: 200 when it answers, 503 when it does not")
        async def health(self) -> JSONResponse:
            start = time.perf_counter()
            status, body = (await asyncio.get_running_loop().run_in_executor(None, self.batcher.rank, [self.probe]))[0]
            ok = status == 200
            return JSONResponse({"status": "ok" if ok else "failing", "model": str(cfg.bundle), "backend": self.batcher.ranker.label,
                                 "probe_ms": round((time.perf_counter() - start) * 1000, 1), **({} if ok else {"error": body})},
                                status_code=200 if ok else 503)

        @api.get("/stats", summary="This replica's counters since it started")
        async def stats(self) -> dict[str, int]:
            return self.batcher.stats.to_dict()

        def check_health(self) -> None:
            """Ray Serve's own replica check: the same probe; raising marks the replica unhealthy."""
            status, body = self.batcher.rank([self.probe])[0]
            if status != 200:
                raise RuntimeError(f"probe ranking failed: {body}")

    return RankDeployment.bind()  # type: ignore[attr-defined]
