"""The PyTorch ranking backend: a :class:`HatLLM` behind the NumPy :class:`Backend` contract."""

from __future__ import annotations

import numpy as np
import torch

from hatllm_edge.masks import MaskKind
from hatllm_edge.model import HatLLM, KVCache


class TorchBackend:
    """Runs :class:`HatLLM` in inference mode, with its weights cast to ``dtype``.

    bf16 weights (not autocast, which would re-cast fp32 weights at every step) halve the
    weight traffic that bounds beam-search decoding, and use the CPU's bf16 dot products.
    """

    def __init__(self, model: HatLLM, dtype: torch.dtype = torch.float32) -> None:
        self.model = model.eval().to(dtype)
        self.dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype))
        self.device = next(model.parameters()).device

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        masks: dict[MaskKind, np.ndarray],
        cache: KVCache | None,
        last_only: bool = False,
    ) -> tuple[np.ndarray, KVCache]:
        t = self._tensor
        keep = torch.tensor([input_ids.shape[1] - 1], device=self.device) if last_only else None
        logits, present = self.model(
            t(input_ids), t(position_ids), {k: t(m) for k, m in masks.items()}, past=cache, use_cache=True, logits_index=keep
        )
        logits = logits.float().cpu().numpy()
        return (logits[:, -1] if last_only else logits), present

    @torch.inference_mode()
    def token_logprobs(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        masks: dict[MaskKind, np.ndarray],
        cache: KVCache | None,
        targets: np.ndarray,
    ) -> tuple[np.ndarray, KVCache]:
        t = self._tensor
        logits, present = self.model(t(input_ids), t(position_ids), {k: t(m) for k, m in masks.items()}, past=cache, use_cache=True)
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, t(targets)[..., None])[..., 0]
        return logprobs.cpu().numpy(), present

    def select(self, cache: KVCache, index: np.ndarray) -> KVCache:
        idx = torch.from_numpy(np.asarray(index, dtype=np.int64)).to(self.device)
        return [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in cache]
