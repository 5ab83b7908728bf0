"""What a run measures: per backend and workload, the latencies and what follows from them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Result:
    backend: str
    workload: str
    latencies_ms: list[float]
    tokens: int  # tokens fed to the model per request
    runs: float = 0.0  # backend passes per request (ONNX Runtime session runs; the assistant's included)
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    requests_per_s: float = 0.0
    users_per_s: float = 0.0
    tokens_per_s: float = 0.0

    def finish(self, batch: int) -> "Result":
        lat = np.asarray(self.latencies_ms)
        self.p50_ms, self.p90_ms, self.p95_ms, self.p99_ms = (float(np.percentile(lat, q)) for q in (50, 90, 95, 99))
        self.requests_per_s = 1000.0 / float(lat.mean())
        self.users_per_s = self.requests_per_s * batch
        self.tokens_per_s = self.tokens * self.requests_per_s
        return self


@dataclass
class BackendRun:
    name: str
    load_s: float
    size_mb: float
    peak_rss_mb: float
    gpu_mem_mb: float | None
    results: list[Result] = field(default_factory=list)
