"""What the graph builder reads from a model: its architecture figures and fp32 weights as
NumPy arrays (:func:`hatllm_edge.export.convert.read_decoder` fills it from PyTorch), so that
:mod:`hatllm_edge.export.graph` never needs torch and the two modules never import each other."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DecoderSpec:
    """Everything the graph needs: the architecture figures and fp32 weights as NumPy arrays
    keyed by the Hugging Face parameter name (``model.layers.0.self_attn.q_proj.weight``)."""

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
    inv_freq: np.ndarray  # [head_dim / 2] float32, the model's own RoPE buffer
    rope_scaling: float  # cos/sin multiplier (1.0 for default RoPE)
    tied_embeddings: bool
    weights: dict[str, np.ndarray]

    @property
    def num_layers(self) -> int:
        return len(self.layer_kinds)
