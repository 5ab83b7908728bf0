"""The PyTorch ranking backend: a :class:`HatLLM` behind the NumPy :class:`Backend` contract."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from hatllm_edge.masks import MaskKind
from hatllm_edge.model import HatLLM, KVCache


class TorchBackend:
    """Runs :class:`HatLLM` in inference mode; ``autocast_bf16`` uses bf16 matmuls (AMX on CPU)."""

    def __init__(self, model: HatLLM, autocast_bf16: bool = False) -> None:
        self.model = model.eval()
        self.autocast_bf16 = autocast_bf16
        self.device = next(model.parameters()).device

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast_bf16 else nullcontext()

    @torch.inference_mode()
    def forward(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        masks: dict[MaskKind, np.ndarray],
        cache: KVCache | None,
        last_only: bool = False,
    ) -> tuple[np.ndarray, KVCache]:
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)  # noqa: E731
        keep = torch.tensor([input_ids.shape[1] - 1], device=self.device) if last_only else None
        with self._autocast():
            logits, present = self.model(
                t(input_ids), t(position_ids), {k: t(m) for k, m in masks.items()}, past=cache, use_cache=True, logits_index=keep
            )
        logits = logits.float().cpu().numpy()
        return (logits[:, -1] if last_only else logits), present

    def select(self, cache: KVCache, index: np.ndarray) -> KVCache:
        idx = torch.from_numpy(np.asarray(index, dtype=np.int64)).to(self.device)
        return [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in cache]
