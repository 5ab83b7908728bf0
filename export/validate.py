"""ONNX Runtime vs PyTorch on the same seeded inputs: the figures every export records.

The inputs exercise what the graph must get right: three rows (no padding, left padding,
right padding), random item segments so that the IN, OR and CR masks all differ, a prefill
step from an empty cache and then a cached step. The ONNX side runs through the engine
(:class:`hatllm_edge.engine.session.OnnxBackend`), so the engine's binding and cache are checked too.
A 4-bit graph is compared twice: with the PyTorch model whose Linears carry the very weights
the 4-bit nodes dequantise to (should match to float rounding) and with the fp32 model (the
quantisation error itself).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from hatllm_edge.core.formats import META_QUANT
from hatllm_edge.core.masks import (
    MaskKind,
    build_masks,
    causal_visibility,
    padded_positions,
)
from hatllm_edge.engine.backend import Backend
from hatllm_edge.engine.quant import dequantized_linears
from hatllm_edge.engine.session import OnnxBackend
from hatllm_edge.training.model import HatLLM
from hatllm_edge.training.torch_backend import TorchBackend


@dataclass(frozen=True)
class Step:
    """One forward step's inputs; ``valid`` [B, Q] marks the non-padding query tokens."""

    input_ids: np.ndarray  # [B, Q] int64
    position_ids: np.ndarray  # [B, Q] int64
    masks: dict[MaskKind, np.ndarray]  # kind -> bool [B, 1, Q, P + Q]
    valid: np.ndarray  # [B, Q] bool


def sample_steps(vocab_size: int, batch: int = 3, prefill: int = 9, step: int = 2, seed: int = 0) -> list[Step]:
    """A prefill of ``prefill`` tokens, then ``step`` cached tokens. Row 1 is left-padded and
    row 2 right-padded by 2 (further rows: random padding); segments are random in 0..4."""
    rng = np.random.default_rng(seed)
    valid = np.ones((batch, prefill), bool)
    for row in range(1, batch):
        pad = 2 if row < 3 else int(rng.integers(0, prefill // 2))
        if row == 2:
            valid[row, prefill - pad:] = False
        else:
            valid[row, :pad] = False
    segments = rng.integers(0, 5, (batch, prefill))
    steps, key_valid, key_segments = [], np.zeros((batch, 0), bool), np.zeros((batch, 0), np.int64)
    for length, q_valid, q_segments in ((prefill, valid, segments),
                                        (step, np.ones((batch, step), bool), np.full((batch, step), 5))):
        key_valid = np.concatenate([key_valid, q_valid], axis=1)
        key_segments = np.concatenate([key_segments, q_segments], axis=1)
        positions = padded_positions(key_valid)[:, -length:]
        masks = build_masks(q_segments, key_segments, causal_visibility(key_valid, length))
        ids = rng.integers(0, vocab_size, (batch, length))
        steps.append(Step(ids.astype(np.int64), positions.astype(np.int64), masks, q_valid))
    return steps


def run_torch(model: HatLLM, steps: list[Step]) -> list[np.ndarray]:
    """HatLLM over the steps with its KV cache, as the PyTorch backend runs it; float32
    logits [B, Q, V] per step."""
    return run_steps(TorchBackend(model), steps)


def run_steps(backend: Backend, steps: list[Step]) -> list[np.ndarray]:
    """Any backend over the steps with its cache; float32 logits [B, Q, V] per step."""
    out, cache = [], None
    for s in steps:
        logits, cache = backend.forward(s.input_ids, s.position_ids, s.masks, cache)
        out.append(logits)
    return out


@dataclass(frozen=True)
class Parity:
    """ONNX logits vs one PyTorch reference over every position of every step."""

    reference: str  # "fp32" or "dequantized" (PyTorch with the 4-bit weights read back)
    max_abs_diff: float
    logit_scale: float  # max |logit| of the reference: read the diff relative to it
    top1_agreement: float  # share of non-padding positions whose argmax agrees
    top5_overlap: float  # mean |top-5 ∩ top-5'| / 5 over non-padding positions

    @property
    def rel_diff(self) -> float:
        return self.max_abs_diff / max(self.logit_scale, 1e-12)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"rel_diff": self.rel_diff}


def compare(reference: str, got: list[np.ndarray], want: list[np.ndarray], steps: list[Step]) -> Parity:
    diff = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
    scale = max(float(np.abs(w).max()) for w in want)
    g = np.concatenate([x[s.valid] for x, s in zip(got, steps)])  # [N, V]
    w = np.concatenate([x[s.valid] for x, s in zip(want, steps)])
    top1 = float((g.argmax(-1) == w.argmax(-1)).mean())
    g5, w5 = np.argsort(-g, -1)[:, :5], np.argsort(-w, -1)[:, :5]
    overlap = float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(g5, w5)]))
    return Parity(reference, diff, scale, top1, overlap)


def dequantized_model(model: HatLLM, proto: onnx.ModelProto) -> HatLLM | None:
    """A copy of ``model`` whose Linears hold the weights the graph's 4-bit nodes use; None
    for a float graph. The input model is not touched."""
    weights = dequantized_linears(proto)
    if not weights:
        return None
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for name, w in weights.items():
            clone.lm.get_parameter(name).copy_(torch.from_numpy(w))
    return clone


@dataclass(frozen=True)
class ValidationReport:
    """``exact``: against the reference the graph should reproduce to float rounding
    (dequantised for 4-bit graphs, fp32 otherwise); ``parities`` holds every comparison."""

    parities: tuple[Parity, ...]
    batch: int
    prefill: int
    step: int
    seed: int

    @property
    def exact(self) -> Parity:
        return self.parities[0]

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": {"batch": self.batch, "prefill": self.prefill, "step": self.step, "seed": self.seed},
                **{p.reference: p.to_dict() for p in self.parities}}


def validate(model: HatLLM, onnx_path: Path, seed: int = 0, batch: int = 3, prefill: int = 9, step: int = 2,
             threads: int | None = 1) -> ValidationReport:
    """Run both sides on :func:`sample_steps` inputs and compare the logits."""
    backend = OnnxBackend(onnx_path, threads=threads, compute="native")  # the graph as stored
    steps = sample_steps(model.lm.config.vocab_size, batch, prefill, step, seed)
    got = run_steps(backend, steps)
    parities = [compare("fp32", got, run_torch(model, steps), steps)]
    if backend.metadata.get(META_QUANT, "none") != "none":
        reference = dequantized_model(model, onnx.load(str(onnx_path)))
        if reference is not None:
            parities.insert(0, compare("dequantized", got, run_torch(reference, steps), steps))
    return ValidationReport(tuple(parities), batch, prefill, step, seed)
