"""HR/NDCG against values worked out by hand, and the paired bootstrap."""

from __future__ import annotations

import math

import pytest

from hatllm_edge.core.metrics import (
    compare_runs,
    mean_metrics,
    paired_bootstrap,
    target_rank,
    user_metrics,
)

KEYS = {"HR@1", "HR@5", "NDCG@5", "HR@10", "NDCG@10"}


def test_target_rank() -> None:
    assert target_rank(["a", "b", "c"], "a") == 0
    assert target_rank(["a", "b", "c"], "c") == 2
    assert target_rank(["a", "b", "c"], "z") is None
    assert target_rank([], "a") is None


@pytest.mark.parametrize(
    "rank,expected",
    [
        (0, {"HR@1": 1, "HR@5": 1, "NDCG@5": 1, "HR@10": 1, "NDCG@10": 1}),
        (1, {"HR@1": 0, "HR@5": 1, "NDCG@5": 1 / math.log2(3), "HR@10": 1, "NDCG@10": 1 / math.log2(3)}),
        (2, {"HR@1": 0, "HR@5": 1, "NDCG@5": 0.5, "HR@10": 1, "NDCG@10": 0.5}),  # 1/log2(4)
        (4, {"HR@1": 0, "HR@5": 1, "NDCG@5": 1 / math.log2(6), "HR@10": 1, "NDCG@10": 1 / math.log2(6)}),
        (5, {"HR@1": 0, "HR@5": 0, "NDCG@5": 0, "HR@10": 1, "NDCG@10": 1 / math.log2(7)}),
        (6, {"HR@1": 0, "HR@5": 0, "NDCG@5": 0, "HR@10": 1, "NDCG@10": 1 / 3}),  # 1/log2(8)
        (9, {"HR@1": 0, "HR@5": 0, "NDCG@5": 0, "HR@10": 1, "NDCG@10": 1 / math.log2(11)}),
        (10, {"HR@1": 0, "HR@5": 0, "NDCG@5": 0, "HR@10": 0, "NDCG@10": 0}),
        (None, {"HR@1": 0, "HR@5": 0, "NDCG@5": 0, "HR@10": 0, "NDCG@10": 0}),
    ],
)
def test_user_metrics_by_hand(rank: int | None, expected: dict[str, float]) -> None:
    got = user_metrics(rank)
    assert set(got) == KEYS
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_mean_metrics_by_hand() -> None:
    got = mean_metrics([0, None, 2, 5])
    assert got == pytest.approx(
        {
            "HR@1": 1 / 4,
            "HR@5": 2 / 4,
            "HR@10": 3 / 4,
            "NDCG@5": (1 + 0.5) / 4,
            "NDCG@10": (1 + 0.5 + 1 / math.log2(7)) / 4,
        }
    )
    assert mean_metrics([]) == {}
    assert all(isinstance(v, float) for v in got.values())


def test_bootstrap_identical_runs() -> None:
    ranks = [0, 3, None, 7, 1, None, 12, 2]
    out = paired_bootstrap(ranks, ranks, samples=500)
    assert out["diff"] == 0 and out["ci_low"] == 0 and out["ci_high"] == 0
    assert out["p_b_better"] == 0
    assert out["metric_a"] == out["metric_b"] == pytest.approx(mean_metrics(ranks)["NDCG@10"])


def test_bootstrap_strictly_better_run() -> None:
    a = [None, 5, None, 9, 3, None, None, 8, 7, None] * 3
    b = [0, 1, 0, 2, 0, 0, 1, 0, 0, 3] * 3
    out = paired_bootstrap(a, b, metric="HR@5", samples=1000, seed=3)
    assert out["diff"] == pytest.approx(mean_metrics(b)["HR@5"] - mean_metrics(a)["HR@5"])
    assert 0 < out["ci_low"] <= out["diff"] <= out["ci_high"]
    assert out["p_b_better"] == 1.0
    reverse = paired_bootstrap(b, a, metric="HR@5", samples=1000, seed=3)
    assert reverse["ci_high"] < 0 and reverse["diff"] == pytest.approx(-out["diff"])
    assert paired_bootstrap(a, b, metric="HR@5", samples=1000, seed=3) == out  # seeded


def test_bootstrap_needs_paired_runs() -> None:
    with pytest.raises(ValueError, match="same users"):
        paired_bootstrap([0, 1], [0])


def test_compare_runs_table_bootstrap_and_errors(tmp_path) -> None:
    import json

    from hatllm_edge.core.errors import InputError

    def write(name, ranks):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"ranks": ranks, "metrics": mean_metrics(list(ranks.values()))}))
        return path

    base = write("base", {"u1": None, "u2": 3, "u3": None})
    better_ranks = {"u1": 0, "u2": 0, "u3": None}
    better = write("better", better_ranks)
    out = compare_runs([base, better], samples=200)
    assert out["table"].splitlines()[0].split()[1:] == ["HR@1", "HR@5", "NDCG@5", "HR@10", "NDCG@10"]
    boot = out["bootstrap"]["better"]["NDCG@10"]
    assert boot["diff"] == pytest.approx(2 / 3 - (1 / math.log2(5)) / 3)
    assert boot["ci_low"] >= 0
    other = write("other", {"u1": 0, "u9": 0, "u3": None})
    with pytest.raises(InputError, match="other users"):
        compare_runs([base, other])
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(InputError, match="not an evaluation JSON"):
        compare_runs([base, tmp_path / "junk.json"])

    # a fuse grid: one run per row, or the row its label picks
    row = {"renormalise": True, "shortlist": 0, "metrics": mean_metrics([0, 0, None])}
    grid = tmp_path / "fuse.json"
    grid.write_text(json.dumps({"grid": [{**row, "assistant_weight": 16.0, "ranks": {"u1": 0, "u2": 0, "u3": None}},
                                         {**row, "assistant_weight": 32.0, "ranks": {"u1": None, "u2": 3, "u3": None}},
                                         {**row, "assistant_weight": 32.0, "shortlist": 50, "ranks": better_ranks},
                                         {**row, "assistant_weight": 0.9, "shortlist": 10, "mixture": True, "ranks": better_ranks}]}))
    rows = compare_runs([base, grid], samples=200)["bootstrap"]
    assert list(rows) == ["fuse@w=16", "fuse@w=32", "fuse@w=32,shortlist=50", "fuse@share=0.9,shortlist=10"]
    assert rows["fuse@w=16"]["NDCG@10"]["diff"] == pytest.approx(boot["diff"])
    picked = compare_runs([f"{grid}@w=32", better, f"{grid}@w=32,shortlist=50"], samples=200)
    assert list(picked["bootstrap"]) == ["better", "fuse@w=32,shortlist=50"]
    assert picked["bootstrap"]["better"]["NDCG@10"]["diff"] == pytest.approx(boot["diff"])
    with pytest.raises(InputError, match="baseline must be one run; pick a row: .*fuse.json@w=16, "):
        compare_runs([grid, base])
    with pytest.raises(InputError, match="no grid row is 'w=8'; its rows: w=16, w=32, w=32,shortlist=50, share=0.9,shortlist=10"):
        compare_runs([base, f"{grid}@w=8"])
    with pytest.raises(InputError, match="is not a fuse grid"):
        compare_runs([base, f"{better}@w=32"])
    # '@' elsewhere in a path, raw beams, and two runs of one name (numbered, not overwritten)
    odd = tmp_path / "user@host"
    odd.mkdir()
    raw = odd / "f@2.json"
    raw.write_text(json.dumps({"grid": [{**row, "renormalise": False, "assistant_weight": 0, "ranks": better_ranks}]}))
    twice = compare_runs([base, raw, f"{raw}@w=0,raw", better, better], samples=200)["bootstrap"]
    assert list(twice) == ["f@2@w=0,raw", "f@2@w=0,raw#2", "better", "better#2"]
    assert twice["better#2"] == twice["better"] == twice["f@2@w=0,raw"]


def test_compare_reads_metrics_from_the_ranks(tmp_path) -> None:
    """A run's table row is its ranks' metrics: a file listing fewer (or stale) metrics compares the same."""
    import json

    ranks = {"u1": 0, "u2": 4, "u3": None}
    full, partial = tmp_path / "full.json", tmp_path / "partial.json"
    full.write_text(json.dumps({"ranks": ranks, "metrics": mean_metrics(list(ranks.values()))}))
    partial.write_text(json.dumps({"ranks": ranks, "metrics": {"NDCG@10": 0.9}}))
    result = compare_runs([full, partial], samples=50)
    rows = result["table"].splitlines()
    assert rows[1].split()[1:] == rows[2].split()[1:]
    assert result["bootstrap"]["partial"]["NDCG@10"]["diff"] == 0


def test_bootstrap_difference_one_seed_is_the_users_bootstrap() -> None:
    import numpy as np

    from hatllm_edge.core.metrics import bootstrap_difference

    rng = np.random.default_rng(0)
    a, b = rng.random(200), rng.random(200) + 0.05
    flat = bootstrap_difference(a, b, samples=500, seed=2)
    assert flat == bootstrap_difference(a[None], b[None], samples=500, seed=2)
    assert flat == bootstrap_difference(a[None], b[None], samples=500, seed=2, resample_seeds=True)  # nothing to resample
    assert flat["diff"] == pytest.approx(b.mean() - a.mean()) and flat["seeds"] == [1, 1] and flat["users"] == 200
    # identical seeds: resampling them changes nothing
    assert bootstrap_difference(np.stack([a, a]), np.stack([b, b]), samples=500, seed=2, resample_seeds=True)["ci_low"] == pytest.approx(flat["ci_low"])
    with pytest.raises(ValueError, match="same users"):
        bootstrap_difference(a, b[:-1])


def test_bootstrap_difference_carries_seed_variance_only_when_asked() -> None:
    """Two seeds of arm b, one far above arm a and one far below: pooled over users alone the
    interval is narrow around zero; with the seeds resampled it spans both seeds' offsets."""
    import numpy as np

    from hatllm_edge.core.metrics import bootstrap_difference

    rng = np.random.default_rng(1)
    a = rng.random((2, 2000))
    b = np.stack([a[0] + 0.2, a[1] - 0.2])
    users_only = bootstrap_difference(a, b, samples=1000)
    both = bootstrap_difference(a, b, samples=1000, resample_seeds=True)
    assert users_only["diff"] == pytest.approx(0.0, abs=1e-9) == both["diff"]
    assert users_only["ci_high"] - users_only["ci_low"] < 0.01
    assert both["ci_low"] < -0.15 and both["ci_high"] > 0.15
    # a difference every seed agrees on stays resolved with the seeds resampled
    steady = bootstrap_difference(a, a + 0.1, samples=1000, resample_seeds=True)
    assert steady["ci_low"] > 0.05 and steady["p_b_better"] == 1.0
