"""Resumable training state, one format for every trainer here: the trainable weights, the
optimiser, the scheduler, torch's RNG, the run's counters and the config it ran with, written
atomically to ``train_state.pt``. A resumed run must have the same config except for the
fields its trainer names as resumable (budgets, validation cadence); settings that name files
compare by the file they name, so a run reached through a symlink or a moved parent resumes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Collection

import torch

from hatllm_edge.core.errors import InputError

STATE_FILE = "train_state.pt"


def save_state(folder: Path, config: dict[str, Any], weights: dict[str, torch.Tensor], optim: torch.optim.Optimizer,
               sched: Any, progress: dict[str, Any], paths: Collection[str] = ()) -> None:
    """Write the state atomically (a reader never sees half a file; a crash keeps the last one).
    ``paths``: fields naming a file or folder, kept as the file they name now (a relative path
    or a link resolved), so a resume elsewhere compares against that file."""
    config = {k: os.path.realpath(v) if k in paths and v is not None else v for k, v in config.items()}
    tmp = folder / f"{STATE_FILE}.partial-{os.getpid()}"
    torch.save({"config": config, "weights": {n: w.detach().clone() for n, w in weights.items()}, "optim": optim.state_dict(),
                "sched": sched.state_dict(), "torch_rng": torch.get_rng_state(),
                **({"cuda_rng": torch.cuda.get_rng_state_all()} if torch.cuda.is_initialized() else {}),
                "progress": progress}, tmp)
    tmp.replace(folder / STATE_FILE)


def _same(before: Any, now: Any, is_path: bool) -> bool:
    if before == now:
        return True
    return is_path and before is not None and now is not None and os.path.realpath(before) == os.path.realpath(now)


def load_state(folder: Path, config: dict[str, Any], resumable: Collection[str], then: dict[str, Any] | None = None,
               paths: Collection[str] = ()) -> dict[str, Any]:
    """The saved state of the run in ``folder``, refused when another setting than ``resumable``
    differs from ``config``. ``then``: values of fields a saved run predates (they had these);
    ``paths``: fields naming a file or folder, equal when they resolve to the same one."""
    path = folder / STATE_FILE
    if not path.is_file():
        raise InputError(f"{folder}: nothing to resume (no {STATE_FILE}); start without --resume")
    saved = torch.load(path, map_location="cpu", weights_only=False)  # the optimiser moves its state to the weights' device
    before = {**(then or {}), **saved["config"]}
    changed = sorted(k for k, v in config.items() if k not in resumable and not _same(before.get(k), v, k in paths))
    if changed:
        raise InputError(f"--resume with other settings than the run in {folder}: {', '.join(changed)} differ "
                         f"(only {', '.join(sorted(resumable))} may change)")
    return saved


def restore(saved: dict[str, Any], optim: torch.optim.Optimizer, sched: Any) -> dict[str, torch.Tensor]:
    """Put the optimiser, the scheduler and torch's RNGs back where they were (the GPUs' where
    the run used one and this one has them); returns the weights, for the trainer to load into
    its model."""
    optim.load_state_dict(saved["optim"])
    sched.load_state_dict(saved["sched"])
    torch.set_rng_state(saved["torch_rng"])
    if "cuda_rng" in saved and torch.cuda.is_available() and len(saved["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    return saved["weights"]


def refuse_overwrite(folder: Path) -> None:
    """A fresh run must not overwrite one in progress."""
    if (folder / STATE_FILE).is_file():
        raise InputError(f"{folder} holds a run in progress ({STATE_FILE}); continue it with --resume or use another folder")
