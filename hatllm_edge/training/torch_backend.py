"""The PyTorch ranking backend: a :class:`HatLLM` behind the NumPy :class:`Backend` contract, and
the ranker of a training checkpoint built on it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hatllm_edge.core.masks import MaskKind
from hatllm_edge.engine.backend import cache_rows, key_positions, pass_tokens
from hatllm_edge.ranking.ranker import Ranker, open_assistant
from hatllm_edge.training.checkpoint import load_checkpoint
from hatllm_edge.training.model import HatLLM, KVCache


def to_nf4(model: HatLLM) -> HatLLM:
    """``model`` with every decoder-layer Linear replaced in place by a bitsandbytes NF4
    ``Linear4bit`` (block 64, fp32 compute): the PyTorch 4-bit reference that the nf4 bundle
    mirrors byte for byte. Embedding and LM head stay float, as bitsandbytes leaves them."""
    import bitsandbytes as bnb

    from hatllm_edge.core.errors import InputError

    if model.config.hidden_size % 64 or model.config.intermediate_size % 64:
        raise InputError(f"bitsandbytes NF4 on the CPU needs Linear input sizes divisible by its block of 64; this "
                         f"model has hidden {model.config.hidden_size}, intermediate {model.config.intermediate_size}")
    for layer in model.lm.model.layers:
        for path, module in list(layer.named_modules()):
            if type(module) is not torch.nn.Linear:
                continue
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=torch.float32, compress_statistics=False, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(module.weight.data.float().clone(), requires_grad=False, blocksize=64,
                                         compress_statistics=False, quant_type="nf4")
            if module.bias is not None:
                q.bias = torch.nn.Parameter(module.bias.data.float().clone(), requires_grad=False)
            parent, _, name = path.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, name, q.to(module.weight.device))
    return model


@dataclass(frozen=True)
class TorchCache:
    """The PyTorch backend's cache: the model's per-layer keys and values, and the positions of
    the cached tokens [B, P] (:func:`~hatllm_edge.engine.backend.key_positions`)."""

    layers: KVCache
    positions: np.ndarray


class TorchBackend:
    """Runs :class:`HatLLM` in inference mode, with its weights cast to ``dtype``.

    bf16 weights (not autocast, which would re-cast fp32 weights at every step) halve the
    weight traffic that bounds beam-search decoding, and use the CPU's bf16 dot products.
    """

    def __init__(self, model: HatLLM, dtype: torch.dtype = torch.float32) -> None:
        self.model = model.eval().to(dtype)
        quantised = any(type(m).__name__ == "Linear4bit" for m in model.modules())
        self.label = "torch-" + ("nf4" if quantised else {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype)))
        self.device = next(model.parameters()).device
        self.pass_tokens = pass_tokens(self.device.type, model.config.vocab_size)
        self.runs = 0

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    exact_layout = False  # float arithmetic: padding moves a result by rounding only

    def _step(self, input_ids: np.ndarray, position_ids: np.ndarray, masks: dict[MaskKind, np.ndarray],
              cache: TorchCache | None, rows: np.ndarray | None, logits_index: torch.Tensor | None) -> tuple[torch.Tensor, TorchCache]:
        """One pass over the cache rows ``rows`` names: logits and the extended cache."""
        t = self._tensor
        idx = cache_rows(rows, input_ids.shape[0], None if cache is None else cache.positions.shape[0])
        past = None
        if cache is not None:
            picked = t(idx)
            past = [(k.index_select(0, picked), v.index_select(0, picked)) for k, v in cache.layers]
        keys = key_positions(None if cache is None else cache.positions, idx, position_ids)
        logits, present = self.model(t(input_ids), t(position_ids), {k: t(m) for k, m in masks.items()}, past=past,
                                     use_cache=True, logits_index=logits_index, key_positions=t(keys))
        self.runs += 1
        return logits, TorchCache(present, keys)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        masks: dict[MaskKind, np.ndarray],
        cache: TorchCache | None,
        last_only: bool = False,
        rows: np.ndarray | None = None,
    ) -> tuple[np.ndarray, TorchCache]:
        keep = torch.tensor([input_ids.shape[1] - 1], device=self.device) if last_only else None
        logits, present = self._step(input_ids, position_ids, masks, cache, rows, keep)
        logits = logits.float().cpu().numpy()
        return (logits[:, -1] if last_only else logits), present

    @torch.inference_mode()
    def token_logprobs(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        masks: dict[MaskKind, np.ndarray],
        cache: TorchCache | None,
        targets: np.ndarray,
        rows: np.ndarray | None = None,
    ) -> tuple[np.ndarray, TorchCache]:
        logits, present = self._step(input_ids, position_ids, masks, cache, rows, None)
        tgt = self._tensor(np.asarray(targets, np.int64))
        picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, tgt if tgt.ndim == 3 else tgt[..., None])
        return (picked if tgt.ndim == 3 else picked[..., 0]).cpu().numpy(), present


def checkpoint_ranker(folder: Path | str, bf16: bool = False, nf4: bool = False) -> Ranker:
    """A PyTorch ranker from a training checkpoint (LoRA merged); ``nf4``: its decoder
    Linears as bitsandbytes NF4 (fp32 compute)."""
    folder = Path(folder)
    loaded = load_checkpoint(folder)
    model = to_nf4(loaded.model) if nf4 else loaded.model
    backend = TorchBackend(model, torch.bfloat16 if bf16 else torch.float32)
    return Ranker(backend, loaded.prompts, loaded.catalog, loaded.meta, open_assistant(folder, loaded.catalog))
