"""Training on a GPU: the same recipe as on the CPU, a run that moves between the two, and a
clear refusal where torch sees no GPU. Through the library, not the CLI, so that it runs on a
bare GPU host with only the training stack (scripts/gpu_train.sh runs it there first)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from hatllm_edge.core.errors import InputError
from hatllm_edge.training.config import TrainConfig
from hatllm_edge.training.model import BaseModelSpec
from hatllm_edge.training.train import train

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def config(out: Path, base: Path, data_files: tuple[Path, Path], **kw: Any) -> TrainConfig:
    """6 users, one window each, 3 windows per step, 2 epochs: 4 steps of the allowed-token loss."""
    inter, items = data_files
    return TrainConfig(out=out, n_in=1, n_cr=1, base=BaseModelSpec(path=str(base)), interactions=inter, items=items,
                       batch_size=3, epochs=2, max_history=10, save_every=1, **kw)


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where torch sees no GPU")
def test_training_on_cuda_without_a_gpu_stops_before_writing(tiny_base: Path, data_files: tuple[Path, Path],
                                                            tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"--device cuda: .* sees no CUDA GPU.*--device cpu"):
        train(config(tmp_path / "run", tiny_base, data_files, device="cuda"), progress=False)
    assert not (tmp_path / "run").exists()


@needs_gpu
def test_a_run_on_the_gpu_follows_the_cpu_and_moves_between_them(tiny_base: Path, data_files: tuple[Path, Path],
                                                                 tmp_path: Path) -> None:
    cpu = train(config(tmp_path / "cpu", tiny_base, data_files), progress=False)
    gpu = train(config(tmp_path / "gpu", tiny_base, data_files, device="cuda"), progress=False)
    assert gpu["finished"] and gpu["steps_done"] == cpu["steps_done"] == 4
    assert gpu["device"] == torch.cuda.get_device_name() and gpu["gpu_peak_mib"] > 0
    assert losses(tmp_path / "gpu") == pytest.approx(losses(tmp_path / "cpu"), rel=0.05)  # bf16 on two kinds of kernels
    assert gpu["best"]["users"] == cpu["best"]["users"] > 0  # validation's beam search ran on the GPU
    moved = tmp_path / "moved"  # one step on the GPU, the rest on the CPU
    first = train(config(moved, tiny_base, data_files, device="cuda", max_minutes=1e-5), progress=False)
    assert first["steps_done"] == 1 and not first["finished"]
    rest = train(config(moved, tiny_base, data_files, device="cpu"), resume=True, progress=False)
    assert rest["finished"] and losses(moved) == pytest.approx(losses(tmp_path / "gpu"), rel=0.05)
