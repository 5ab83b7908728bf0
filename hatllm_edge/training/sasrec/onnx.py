"""SASRec as ONNX (item_ids [B, L] -> scores [B, num_items]), checked against PyTorch: the shipped assistant's graph."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from hatllm_edge.core.formats import ASSISTANT_INPUT as ONNX_INPUT
from hatllm_edge.core.formats import ASSISTANT_ONNX as ONNX_FILE
from hatllm_edge.core.formats import ASSISTANT_OUTPUT as ONNX_OUTPUT
from hatllm_edge.ranking.assistant import left_pad
from hatllm_edge.training.sasrec.checkpoint import load_checkpoint
from hatllm_edge.training.sasrec.evaluate import onnx_scorer, torch_scorer
from hatllm_edge.training.sasrec.model import SASRec


class _NextItem(nn.Module):
    def __init__(self, model: SASRec) -> None:
        super().__init__()
        self.model = model

    def forward(self, item_ids: torch.Tensor) -> torch.Tensor:
        return self.model.next_item_log_probs(item_ids)


def export_model_onnx(model: SASRec, path: Path, opset: int = 17) -> Path:
    """``item_ids`` [B, L] int64 (left-padded, any L) -> ``scores`` [B, num_items] log-probabilities."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was = model.training
    wrapper = _NextItem(model).eval()  # the exporter restores the wrapper's mode on every submodule
    example = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int64).clamp(max=model.cfg.num_items)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy (TorchScript) exporter's deprecation notice
        torch.onnx.export(
            wrapper, (example,), str(path), dynamo=False, opset_version=opset,
            input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
            dynamic_axes={ONNX_INPUT: {0: "batch", 1: "length"}, ONNX_OUTPUT: {0: "batch"}},
        )
    model.train(was)
    return path


def onnx_parity(model: SASRec, path: Path, batch: int = 8, seed: int = 0) -> dict[str, float]:
    """Max abs difference of ONNX Runtime vs PyTorch log-probabilities on seeded left-padded
    histories of several lengths (1 .. max_len + 5, so the cut to ``max_len`` is covered)."""
    rng = np.random.default_rng(seed)
    scorer, ref = onnx_scorer(path), torch_scorer(model)
    worst = 0.0
    for length in sorted({1, 3, model.cfg.max_len, model.cfg.max_len + 5}):
        rows = [rng.integers(1, model.cfg.num_items + 1, size=int(rng.integers(1, length + 1))).tolist() for _ in range(batch)]
        x = left_pad(rows, length)
        worst = max(worst, float(np.abs(scorer(x) - ref(x)).max()))
    return {"max_abs_diff": worst}


def export_checkpoint_onnx(folder: Path, out: Path | None = None, opset: int = 17, check: bool = True) -> dict[str, Any]:
    """Export a checkpoint folder's model to ONNX (default: ``<folder>/sasrec.onnx``); with
    ``check``, compare ONNX Runtime to PyTorch (raises when they differ by more than 1e-4)."""
    folder = Path(folder)
    model, meta = load_checkpoint(folder)
    path = export_model_onnx(model, Path(out) if out else folder / ONNX_FILE, opset)
    report: dict[str, Any] = {"onnx": str(path), "opset": opset, "bytes": path.stat().st_size,
                              "input": ONNX_INPUT, "output": ONNX_OUTPUT, "num_items": meta["model"]["num_items"]}
    if check:
        report.update(onnx_parity(model, path))
        if report["max_abs_diff"] > 1e-4:
            raise RuntimeError(f"{path}: ONNX Runtime differs from PyTorch by {report['max_abs_diff']:.2e}")
    return report
