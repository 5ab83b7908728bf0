"""Resuming refuses another run's settings but follows a run folder that moved: paths compare by
the file they name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hatllm_edge.core.errors import InputError
from hatllm_edge.training.resume import load_state, restore, save_state


def _saved_run(folder: Path, init_from: Path) -> tuple[dict, torch.nn.Linear]:
    folder.mkdir(parents=True)
    layer = torch.nn.Linear(3, 2)
    optim = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: 1.0)
    layer(torch.ones(1, 3)).sum().backward()
    optim.step()
    sched.step()
    config = {"out": str(folder), "init_from": str(init_from), "lr": 1e-3, "max_minutes": None}
    save_state(folder, config, dict(layer.named_parameters()), optim, sched, {"step": 1})
    return config, layer


def test_a_moved_run_resumes_and_another_run_is_refused(tmp_path: Path) -> None:
    start = tmp_path / "r1"
    start.mkdir()
    config, layer = _saved_run(tmp_path / "runs" / "r2", start)
    (tmp_path / "elsewhere").symlink_to(tmp_path / "runs")  # the runs folder reached another way
    moved = tmp_path / "elsewhere" / "r2"
    same = {**config, "out": str(moved), "init_from": str(tmp_path / "elsewhere" / ".." / "r1"), "max_minutes": 5}
    saved = load_state(moved, same, resumable=("out", "max_minutes"), paths=("init_from",))
    assert saved["progress"] == {"step": 1} and saved["config"] == config
    optim = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    weights = restore(saved, optim, torch.optim.lr_scheduler.LambdaLR(optim, lambda step: 1.0))
    assert torch.equal(weights["weight"], layer.weight.detach())

    other = tmp_path / "r0"
    other.mkdir()
    with pytest.raises(InputError, match=r"init_from differ"):  # another adapter to start from
        load_state(moved, {**same, "init_from": str(other)}, resumable=("out", "max_minutes"), paths=("init_from",))
    with pytest.raises(InputError, match=r"lr differ .*only max_minutes, out may change"):
        load_state(moved, {**same, "lr": 2e-3}, resumable=("out", "max_minutes"), paths=("init_from",))
    with pytest.raises(InputError, match=r"init_from differ"):  # a path field only when named as one
        load_state(moved, same, resumable=("out", "max_minutes"))
    with pytest.raises(InputError, match="nothing to resume"):
        load_state(tmp_path / "r0", same, resumable=("out",))


def test_a_relative_path_means_the_file_it_named_when_saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same relative spelling from another working directory names another file: refused."""
    for d in ("a", "b"):
        (tmp_path / d / "start").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a")
    layer = torch.nn.Linear(2, 2)
    optim = torch.optim.SGD(layer.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: 1.0)
    (tmp_path / "run").mkdir()
    config = {"out": str(tmp_path / "run"), "init_from": "start"}
    save_state(tmp_path / "run", config, dict(layer.named_parameters()), optim, sched, {"step": 1}, paths=("init_from",))
    assert load_state(tmp_path / "run", config, ("out",), paths=("init_from",))["config"]["init_from"] == str(tmp_path / "a" / "start")
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(InputError, match="init_from differ"):
        load_state(tmp_path / "run", config, ("out",), paths=("init_from",))
