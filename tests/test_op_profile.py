"""scripts/op_profile.py's summary of an ONNX Runtime profile: warm-up runs left out, shares of
the kernel time, the costliest operator's shapes."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="module")
def summarise() -> Any:
    path = Path(__file__).resolve().parents[1] / "scripts" / "op_profile.py"
    spec = importlib.util.spec_from_file_location("op_profile", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.summarise


def _run(ts: int, dur: int) -> dict[str, Any]:
    return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}


def _node(ts: int, op: str, dur: int, shape: list[int]) -> dict[str, Any]:
    return {"cat": "Node", "name": f"{op}_{ts}_kernel_time", "ts": ts, "dur": dur,
            "args": {"op_name": op, "input_type_shape": [{"float": shape}]}}


def test_warm_up_runs_are_left_out_and_shares_add_up(summarise: Any) -> None:
    events = [_run(0, 900), _node(1, "Attention", 800, [1, 9]),  # warm-up: slow first run
              _run(1000, 100), _node(1001, "Attention", 60, [2, 8]), _node(1070, "MatMul", 30, [2, 8]),
              _run(2000, 100), _node(2001, "Attention", 50, [3, 8]), _node(2060, "MatMul", 40, [3, 8]), {"cat": "Kernel"}]
    out = summarise(events, skip_runs=1)
    assert out["runs"] == 2 and out["run_ms"] == pytest.approx(0.2) and out["kernel_ms"] == pytest.approx(0.18)
    assert [r["op"] for r in out["ops"]] == ["Attention", "MatMul"]
    assert out["ops"][0]["ms"] == pytest.approx(0.11) and sum(r["share"] for r in out["ops"]) == pytest.approx(1)
    assert out["ops"][1]["calls_per_run"] == 1
    assert [s["inputs"] for s in out["top_op_shapes"]] == [[{"float": [2, 8]}], [{"float": [3, 8]}]]


def test_no_timed_run_is_an_empty_summary(summarise: Any) -> None:
    out = summarise([_run(0, 5), _node(1, "Add", 3, [1])], skip_runs=1)
    assert out["runs"] == 0 and out["ops"] == [] and out["top_op_shapes"] == []
