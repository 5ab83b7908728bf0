"""Activation statistics for the engine's int8 route, measured at export.

The CPU engine quantises every matmul input per token to 127 steps of the token's absmax
(:func:`hatllm_edge.engine.int8.int8_rows`). A few input channels run far larger than the rest, so
they set the step and the other channels round to a handful of codes. SmoothQuant (Xiao et
al., 2023) moves that range into the weights: channel j of the input is divided by
s_j = max|x_j|^a / max|w_j|^(1-a) and the weight's column j multiplied by it, which is exact in
float. The engine needs max|x_j| per matmul input for that; it is measured here, on prompts
of seeded random catalog titles (no interaction data needed, so any checkpoint can be
exported), and stored in the graph as ``calibration/<module>.absmax`` initializers, which the
float graph ignores and the engine's int8 rewrite reads.
"""

from __future__ import annotations

import random
from typing import Iterable, Iterator

import numpy as np
import torch

from hatllm_edge.core.data import Catalog
from hatllm_edge.core.masks import (
    build_masks,
    causal_visibility,
    left_padded,
    padded_positions,
)
from hatllm_edge.core.prompt import PromptBuilder
from hatllm_edge.training.model import HatLLM

CALIBRATION_PROMPTS = 16


def calibration_sequences(prompts: PromptBuilder, catalog: Catalog, count: int = CALIBRATION_PROMPTS,
                          seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(token ids, segment ids) of ``count`` prompts, each a seeded random history of 1 to
    ``max_history`` catalog titles followed by one more title as the answer: the two kinds of
    token the engine runs (prompts, then answers)."""
    rng = random.Random(seed)
    for _ in range(count):
        size = rng.randint(1, max(1, min(prompts.max_history, len(catalog))))
        history = [catalog.titles[i] for i in rng.sample(range(len(catalog)), size)]
        p = prompts.prompt(history)
        a = prompts.answer(rng.choice(catalog.titles), prompts.answer_segment(p))
        yield np.concatenate([p.ids, a.ids]), np.concatenate([p.segments, a.segments])


@torch.no_grad()
def activation_absmax(model: HatLLM, sequences: Iterable[tuple[np.ndarray, np.ndarray]], batch: int = 8) -> dict[str, np.ndarray]:
    """max |x_j| per input channel of every Linear of ``model`` (keyed by module name, such as
    ``model.layers.0.self_attn.q_proj`` or ``lm_head``) over every real position of
    ``sequences``, run ``batch`` at a time (left-padded; padding is not counted)."""
    absmax: dict[str, torch.Tensor] = {}
    real = torch.zeros(0, dtype=torch.bool)  # which flattened positions of the running batch are not padding
    hooks = []

    def record(name: str):  # type: ignore[no-untyped-def]
        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            seen = x[real].abs().float().amax(0)
            absmax[name] = torch.maximum(absmax[name], seen) if name in absmax else seen
        return hook

    for name, module in model.lm.named_modules():
        if isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_pre_hook(record(name)))
    rows = list(sequences)
    try:
        for at in range(0, len(rows), batch):
            chunk = rows[at : at + batch]
            ids, segs, valid = left_padded(chunk)
            real = torch.from_numpy(valid.reshape(-1))
            masks = build_masks(segs, segs, causal_visibility(valid, ids.shape[1]))
            model(torch.from_numpy(ids), torch.from_numpy(padded_positions(valid)), {k: torch.from_numpy(m) for k, m in masks.items()})
    finally:
        for h in hooks:
            h.remove()
    return {name: value.numpy().astype(np.float32) for name, value in absmax.items()}
