"""Validation during training: the fixed seeded users that pick a run's best step, ranked on the
full catalog by the PyTorch backend with the same beam search the engine uses."""

from __future__ import annotations

from typing import Any

import torch

from hatllm_edge.core.data import Dataset, Example
from hatllm_edge.core.machine import release_free_memory
from hatllm_edge.core.prompt import PromptBuilder
from hatllm_edge.ranking.loo import rank_split, split_examples
from hatllm_edge.ranking.scoring import Fusion
from hatllm_edge.training.model import HatLLM

VALID_SEED = 0


def validation_users(data: Dataset, max_history: int, n: int) -> list[Example]:
    """The fixed subset of validation examples that picks the best step (seeded, data order).
    Its seed is not the run's, so runs of different seeds are chosen on the same users."""
    return split_examples(data, "valid", n, True, VALID_SEED, max_history)


def validate(model: HatLLM, prompts: PromptBuilder, data: Dataset, examples: list[Example], k: int = 10,
             bf16: bool = True, renormalise: bool = False) -> dict[str, Any]:
    """Full-catalog NDCG/HR of the current weights on ``examples`` (PyTorch, beam k, on the
    model's device; bf16 autocast keeps the fp32 master weights and halves the cost).
    ``renormalise``: beam steps scored over the trie node's children, the decoding that
    matches the masked-softmax loss."""
    from hatllm_edge.training.torch_backend import TorchBackend

    try:
        with torch.autocast(model.head.weight.device.type, dtype=torch.bfloat16, enabled=bf16):
            result = rank_split(TorchBackend(model), prompts, data, "valid", k, k, progress=False, examples=examples,
                                fusion=lambda chunk: Fusion(renormalise=renormalise))
    finally:
        model.train()
        release_free_memory()
    return {"metrics": result["metrics"], "users": result["users"], "renormalise": renormalise, "wall_s": result["wall_s"]}
