"""scripts/compare_arms.py on hand-made evaluations: which comparisons it reports per seed, as
seed spread and pooled, and that resampling seeds widens the pooled interval when seeds disagree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_arms.py"


def evaluation(path: Path, ranks: list[int | None]) -> str:
    path.write_text(json.dumps({"ranks": {f"u{i}": r for i, r in enumerate(ranks)}, "metrics": {}}))
    return str(path)


def run_script(tmp_path: Path, spec: dict, *flags: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the script on ``spec``: its process (checked to succeed) and the comparison it wrote."""
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "out.json"
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "spec.json"), "--out", str(out), *flags],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done, json.loads(out.read_text())


def test_per_seed_spread_and_pooled(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    users = 400

    def ranks(hit_rate: float) -> list[int | None]:
        return [int(rng.integers(0, 10)) if rng.random() < hit_rate else None for _ in range(users)]

    # arm b's two seeds disagree: one far above arm a, one far below
    rates = {"a": [0.3, 0.3], "b": [0.6, 0.05]}
    spec = {"question": "q", "baseline": "a", "metrics": ["NDCG@10", "HR@10"], "arms": {
        arm: {"schedule": {}, "seeds": [
            {"label": f"{arm}{i}", "rounds": [{"round": 1, "seed": i}],
             "evals": {"test/llm": evaluation(tmp_path / f"{arm}{i}.json", ranks(rate)),
                       **({"valid/llm": evaluation(tmp_path / f"{arm}{i}v.json", ranks(rate))} if i == 0 else {})}}
            for i, rate in enumerate(seed_rates)]}
        for arm, seed_rates in rates.items()}}
    done, result = run_script(tmp_path, spec, "--markdown")
    assert result["difference"].startswith("b minus a")
    test = result["comparisons"]["test/llm"]
    assert [r["seeds"] for r in test["per_seed"]] == [["a0", "b0"], ["a1", "b1"]]
    assert test["per_seed"][0]["HR@10"]["ci_low"] > 0 > test["per_seed"][1]["HR@10"]["ci_high"]
    assert [r["seeds"] for r in test["seed_spread"]["b"]] == [["b0", "b1"]]
    assert test["seed_spread"]["b"][0]["HR@10"]["diff"] < -0.4
    users_only, both = test["pooled"]["HR@10"], test["pooled_seeds_resampled"]["HR@10"]
    assert users_only["diff"] == both["diff"] and users_only["users"] == users
    assert both["ci_high"] - both["ci_low"] > 3 * (users_only["ci_high"] - users_only["ci_low"])
    # an evaluation only the first seeds have: compared per seed, never pooled
    valid = result["comparisons"]["valid/llm"]
    assert len(valid["per_seed"]) == 1 and valid["pooled"] is None and valid["seed_spread"] == {}
    assert "pooled, seeds resampled" in done.stdout
    # --markdown: the first metric (NDCG@10), the usual readings first, a cell per seed and per difference
    *_, table, legend = (part.splitlines() for part in done.stdout.split("\n\n"))
    assert table[0] == ("| NDCG@10 | a #0 | a #1 | b #0 | b #1 | b minus a, #0 | b minus a, #1 | pooled "
                        "| pooled, seeds resampled | a #1 minus #0 | b #1 minus #0 |")
    cells = [c.strip() for c in table[2].split("|")[1:-1]]
    assert cells[0] == "validation, the LLM alone" and cells[2] == cells[4] == cells[6] == cells[7] == ""
    cells = [c.strip() for c in table[3].split("|")[1:-1]]
    ndcg = test["per_seed"][0]["NDCG@10"]
    assert cells[0] == "test, the LLM alone" and cells[1] == f"{ndcg['a']:.4f}" and cells[3] == f"{ndcg['b']:.4f}"
    assert cells[5] == f"**{ndcg['diff']:+.4f} [{ndcg['ci_low']:+.4f}, {ndcg['ci_high']:+.4f}]**"  # b0 far above a0
    assert not cells[8].startswith("**")  # the seeds resampled: b's two seeds disagree too much to tell
    assert len(table) == 4 and legend == ["a #0: a0", "a #1: a1", "b #0: b0", "b #1: b1"]


def test_a_seed_entered_before_its_evaluations_is_pending(tmp_path: Path) -> None:
    """A seed whose round is still training (its record not yet written) is listed, not read,
    and keeps its arm out of the pooled rows until it is evaluated."""
    hits = [1, None, 3, None] * 25
    spec = {"question": "q", "baseline": "a", "metrics": ["NDCG@10"], "arms": {
        "a": {"schedule": {}, "seeds": [{"label": "a0", "rounds": [{"round": 1}], "evals": {"test/llm": evaluation(tmp_path / "a0.json", hits)}}]},
        "b": {"schedule": {}, "seeds": [
            {"label": "b0", "rounds": [{"round": 1}], "evals": {"test/llm": evaluation(tmp_path / "b0.json", hits)}},
            {"label": "b1", "rounds": [str(tmp_path / "not-yet" / "hatllm.json")], "evals": {}}]}}}
    _, result = run_script(tmp_path, spec)
    pending = result["arms"]["b"]["seeds"][1]
    assert pending["pending"] is True and pending["rounds"] == spec["arms"]["b"]["seeds"][1]["rounds"]
    test = result["comparisons"]["test/llm"]
    assert len(test["per_seed"]) == 1 and test["pooled"] is None
