"""What the graph builder reads from a model: its architecture figures and fp32 weights as
NumPy arrays (:func:`hatllm_edge.export.convert.read_decoder` fills it from PyTorch), so that
:mod:`hatllm_edge.export.graph` never needs torch and the two modules never import each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Activation = Literal["silu", "gelu_tanh"]


@dataclass(frozen=True)
class Rope:
    """One rotary table: cos/sin = (position x inv_freq) x scaling."""

    inv_freq: np.ndarray  # [head_dim / 2] float32, the model's own buffer
    scaling: float  # cos/sin multiplier (1.0 for default RoPE)


@dataclass(frozen=True)
class DecoderSpec:
    """Everything the graph needs: the architecture figures and fp32 weights as NumPy arrays
    keyed by the Hugging Face parameter name (``model.layers.0.self_attn.q_proj.weight``).

    Llama/Qwen2 use the defaults of the last fields. Gemma3 sets them all: its embedding is
    scaled by sqrt(hidden), each sub-block is normalised before and after ("sandwich"), q and k
    are normalised per head, the MLP is GELU (tanh), its local layers use their own RoPE table
    and a sliding window. Its RMSNorm weights are stored as 1 + w, which is what it multiplies by.
    """

    model_type: str
    layer_kinds: tuple[str, ...]
    n_in: int
    n_cr: int
    vocab_size: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    attn_scale: float
    ropes: tuple[Rope, ...]  # the distinct tables; ``layer_rope[i]`` indexes layer i's
    layer_rope: tuple[int, ...]
    tied_embeddings: bool
    weights: dict[str, np.ndarray]
    embed_scale: float = 1.0
    sandwich_norms: bool = False
    qk_norm: bool = False
    activation: Activation = "silu"
    sliding_window: int | None = None
    layer_sliding: tuple[bool, ...] = ()  # empty: no layer slides

    @property
    def num_layers(self) -> int:
        return len(self.layer_kinds)
