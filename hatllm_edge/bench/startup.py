"""Start-up: the wall time of a whole ``hatllm-edge rank`` process, as a script calling the
command line sees it (interpreter, imports, session and caches, the ranking, the output),
split into what the interpreter and the command line's imports cost on their own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from hatllm_edge.core.errors import HatLLMError


def _wall(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise HatLLMError(f"{' '.join(cmd[:4])} ... exited {done.returncode}: {done.stderr.strip()[-400:]}")
    return took, done.stdout


def cli_command() -> list[str]:
    """How this install starts the command line: its console script, else the module."""
    script = shutil.which("hatllm-edge", path=str(Path(sys.executable).parent)) or shutil.which("hatllm-edge")
    return [script] if script else [sys.executable, "-m", "hatllm_edge"]


def run_startup(bundle: Path, request: dict[str, Any], repeats: int = 5, threads: int | None = None,
                device: str = "cpu") -> dict[str, Any]:
    """p50 (and every run) of: ``python -c pass``, the command line's import, and
    ``hatllm-edge rank --model BUNDLE -q REQUEST`` end to end, ``repeats`` times each after one
    warm-up run (which fills the int8 graph cache, as any first use does)."""
    env = dict(os.environ, HATLLM_DEBUG="")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "request.json"
        path.write_text(json.dumps(request))
        rank = cli_command() + ["rank", str(path), "--model", str(bundle), "--device", device, "-q"]
        rank += ["--threads", str(threads)] if threads else []
        phases = {"python": [sys.executable, "-c", "pass"],
                  "cli_import": [sys.executable, "-c", "import hatllm_edge.cli"],
                  "rank": rank}
        _wall(rank, env)  # warm-up
        runs: dict[str, list[float]] = {name: [] for name in phases}
        engine_ms: list[float] = []
        for _ in range(repeats):
            for name, cmd in phases.items():
                took, out = _wall(cmd, env)
                runs[name].append(round(took, 3))
                if name == "rank":
                    engine_ms.append(float(json.loads(out)["latency_ms"]))
    return {"bundle": str(bundle), "command": " ".join(rank), "repeats": repeats,
            "p50_s": {name: float(np.median(v)) for name, v in runs.items()}, "runs_s": runs,
            "engine_ms_p50": float(np.median(engine_ms))}
