"""HatLLM (PyTorch) -> ``model.onnx``: read the decoder, build the graph, quantise, save.

The graph is written directly from the Hugging Face module's weights (see
:mod:`hatllm_edge.export.graph`) instead of tracing the model with ``torch.onnx.export(dynamo=True)``.
Why: tracing a Hugging Face forward through the swapped attention function gives a graph
that depends on transformers internals, specialises dimensions that are 0 or 1 in the example
(the empty first-step cache, B = 1), takes tens of seconds per export and still needs a
rewrite pass for the 4-bit contrib ops. Emitting the few ops of a Llama/Qwen2 decoder is
deterministic, takes milliseconds for the tiny test models, names nodes by path and puts
``MatMulBnb4`` in place directly; :mod:`hatllm_edge.export.validate` proves parity with PyTorch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from hatllm_edge.core.errors import InputError
from hatllm_edge.core.formats import (
    DTYPES,
    EMBEDDINGS,
    GRAPH_CONTRACT,
    GRAPH_REVISION,
    META_DTYPE,
    META_EMBEDDINGS,
    META_LAYER_KINDS,
    META_MODEL_TYPE,
    META_QUANT,
    QUANTS,
    DType,
    Embeddings,
    Quant,
)
from hatllm_edge.engine.int8 import CALIBRATION_PREFIX
from hatllm_edge.export.graph import build_decoder
from hatllm_edge.export.quant.int4 import Int4Options, quantize_int4
from hatllm_edge.export.spec import DecoderSpec, Rope
from hatllm_edge.training.model import SUPPORTED_TYPES, HatLLM

MIN_OPSET = 23  # Attention, RotaryEmbedding and RMSNormalization enter the standard here
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf cannot serialise a message over 2 GiB
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _plain_linear(module: torch.nn.Module, path: str) -> torch.nn.Linear:
    if type(module) is not torch.nn.Linear:
        raise InputError(
            f"{path} is a {type(module).__name__}, not a plain nn.Linear: merge LoRA adapters "
            "(merge_and_unload) and remove quantisation wrappers before export"
        )
    return module


ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}  # Hugging Face name -> graph's
GEMMA_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm", "self_attn.q_norm", "self_attn.k_norm")


def _ropes(lm: torch.nn.Module, cfg: Any) -> tuple[tuple[Rope, ...], tuple[int, ...]]:
    """The model's RoPE tables and which one each layer reads: one for Llama/Qwen2; Gemma3
    keeps one per layer type (local layers rotate with a smaller base)."""
    rotary = lm.model.rotary_emb
    types = list(dict.fromkeys(cfg.layer_types)) if getattr(rotary, "layer_types", None) else [None]
    ropes = []
    for kind in types:
        prefix = f"{kind}_" if kind else ""
        rope_type = rotary.rope_type[kind] if kind else rotary.rope_type
        if rope_type in ("dynamic", "longrope"):
            # these recompute inv_freq from the sequence length at run time; a fixed graph cannot
            raise InputError(f"rope_type {rope_type!r} depends on the sequence length; not exportable")
        inv_freq = getattr(rotary, f"{prefix}inv_freq").detach().float().cpu().numpy()
        ropes.append(Rope(inv_freq, float(getattr(rotary, f"{prefix}attention_scaling"))))
    layer_rope = tuple(types.index(cfg.layer_types[i] if types != [None] else None) for i in range(cfg.num_hidden_layers))
    return tuple(ropes), layer_rope


def read_decoder(model: HatLLM) -> DecoderSpec:
    """Check that the model is a decoder this exporter writes exactly, and read its weights."""
    lm, cfg = model.lm, model.config
    if cfg.model_type not in SUPPORTED_TYPES:
        raise InputError(f"model type {cfg.model_type!r} cannot be exported; use one of {SUPPORTED_TYPES}")
    gemma = cfg.model_type == "gemma3_text"
    act = getattr(cfg, "hidden_activation", None) if gemma else cfg.hidden_act
    if act not in ACTIVATIONS:
        raise InputError(f"hidden_act {act!r} is not supported by the exporter (only {sorted(ACTIVATIONS)})")
    ropes, layer_rope = _ropes(lm, cfg)
    weights: dict[str, torch.Tensor] = {}
    layers = lm.model.layers
    for i, layer in enumerate(layers):
        for name in LINEARS:
            path = f"model.layers.{i}.{name}"
            linear = _plain_linear(layer.get_submodule(name), path)
            weights[f"{path}.weight"] = linear.weight
            if linear.bias is not None:
                weights[f"{path}.bias"] = linear.bias
        for norm in GEMMA_NORMS if gemma else GEMMA_NORMS[:2]:
            weights[f"model.layers.{i}.{norm}.weight"] = layer.get_submodule(norm).weight
    weights["model.embed_tokens.weight"] = lm.model.embed_tokens.weight
    weights["model.norm.weight"] = lm.model.norm.weight
    head = _plain_linear(lm.lm_head, "lm_head")
    if head.bias is not None:
        raise InputError("lm_head with a bias is not supported by the exporter")
    tied = head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()
    if not tied:
        weights["lm_head.weight"] = head.weight
    arrays = {k: v.detach().float().cpu().numpy() for k, v in weights.items()}
    if gemma:  # Gemma's RMSNorm multiplies by 1 + w
        arrays |= {k: 1.0 + v for k, v in arrays.items() if k.endswith("norm.weight")}
    attn = layers[0].self_attn
    windows = [getattr(layer.self_attn, "sliding_window", None) for layer in layers]  # any family (Qwen2 may slide)
    window = next((w for w in windows if w is not None), None)
    return DecoderSpec(
        model_type=cfg.model_type,
        layer_kinds=tuple(model.schedule.kinds),
        n_in=model.schedule.n_in,
        n_cr=model.schedule.n_cr,
        vocab_size=lm.model.embed_tokens.weight.shape[0],
        hidden_size=cfg.hidden_size,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=attn.head_dim,
        rms_norm_eps=float(cfg.rms_norm_eps),
        attn_scale=float(attn.scaling),
        ropes=ropes,
        layer_rope=layer_rope,
        tied_embeddings=tied,
        weights=arrays,
        embed_scale=float(lm.model.embed_tokens.embed_scale) if gemma else 1.0,
        sandwich_norms=gemma,
        qk_norm=gemma,
        activation=ACTIVATIONS[act],  # type: ignore[arg-type]
        sliding_window=window,
        layer_sliding=tuple(w is not None for w in windows) if window else (),
    )


def graph_metadata(spec: DecoderSpec, quant: Quant, dtype: DType, int4: Int4Options | None,
                   embeddings: Embeddings = "float") -> dict[str, str]:
    """The ``hatllm.*`` metadata_props the engine reads (layer kinds, cache geometry, quant), and
    which graph contract and revision wrote the graph."""
    meta = {
        META_LAYER_KINDS: json.dumps(list(spec.layer_kinds)),
        META_MODEL_TYPE: spec.model_type,
        "hatllm.n_in": str(spec.n_in),
        "hatllm.n_cr": str(spec.n_cr),
        "hatllm.num_layers": str(spec.num_layers),
        "hatllm.num_kv_heads": str(spec.num_kv_heads),
        "hatllm.head_dim": str(spec.head_dim),
        "hatllm.vocab_size": str(spec.vocab_size),
        META_QUANT: quant,
        META_DTYPE: dtype,
        META_EMBEDDINGS: embeddings,
        "hatllm.graph_contract": str(GRAPH_CONTRACT),
        "hatllm.graph_revision": str(GRAPH_REVISION),
    }
    if quant == "nf4":
        meta["hatllm.quant_config"] = json.dumps({"quant_type": "nf4", "block_size": 64})
    elif quant == "int4" and int4 is not None:
        meta["hatllm.quant_config"] = json.dumps(int4.to_dict())
    elif quant == "int8":
        meta["hatllm.quant_config"] = json.dumps({"quant_type": "int8", "block_size": 64, "symmetric": True})
    return meta


def resolve_embeddings(quant: Quant, embeddings: Embeddings | None) -> Embeddings:
    """None -> the default for ``quant`` (see :func:`export_onnx`)."""
    return embeddings or ("int8" if quant in ("int4", "int8") else "float")


def export_onnx(
    model: HatLLM,
    path: Path,
    quant: Quant = "none",
    dtype: DType = "fp32",
    opset: int = MIN_OPSET,
    int4: Int4Options | None = None,
    metadata: dict[str, str] | None = None,
    external_data: bool | None = None,
    embeddings: Embeddings | None = None,
    calibration: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write ``model`` to ``path`` as ONNX (graph contract in :mod:`hatllm_edge.export.graph`).

    quant: "none" (weights in ``dtype``), "nf4" (bitsandbytes NF4 -> ``MatMulBnb4``), "int4"
    (``MatMulNBits`` via ONNX Runtime's quantiser, options in ``int4``) or "int8" (8-bit
    ``MatMulNBits``, block 64). ``embeddings``: the tied embedding / LM head in ``dtype``
    ("float") or 8-bit ("int8"); None = 8-bit for int4 and int8 (the embedding is a fifth of
    a 135M model, so a 4-bit bundle would otherwise stay above 30% of fp32), float for nf4,
    which mirrors a bitsandbytes 4-bit model (whose embedding and head stay float) exactly.
    ``external_data`` None: only for models too big for one protobuf (the weights then go to
    ``<name>.data`` beside it). ``calibration``: per Linear module, the max |input| of each
    channel (:func:`hatllm_edge.export.calibrate.activation_absmax`), stored for the engine's int8 route.
    Returns ``path``.
    """
    if quant not in QUANTS:
        raise InputError(f"quant {quant!r}: expected one of {QUANTS}")
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r}: expected one of {DTYPES}")
    if opset < MIN_OPSET:
        raise InputError(f"opset {opset}: the graph needs opset >= {MIN_OPSET} (Attention, RotaryEmbedding)")
    embeddings = resolve_embeddings(quant, embeddings)
    if embeddings not in EMBEDDINGS:
        raise InputError(f"embeddings {embeddings!r}: expected one of {EMBEDDINGS}")
    spec = read_decoder(model)
    linears = quant if quant in ("nf4", "int8") else "none"
    if quant == "int4":
        int4 = int4 or Int4Options()
        unknown = set(int4.eight_bit) - set(LINEARS)
        if unknown:
            raise InputError(f"8-bit Linears {sorted(unknown)}: expected names from {LINEARS}")
    eight_bit = int4.eight_bit if quant == "int4" and int4 else ()
    proto = build_decoder(spec, quant=linears, dtype=dtype, opset=opset, embeddings=embeddings, eight_bit=eight_bit)
    if quant == "int4":
        proto = quantize_int4(proto, int4)  # only the float MatMuls: the 8-bit ones are MatMulNBits already
    for name, absmax in sorted((calibration or {}).items()):
        proto.graph.initializer.append(numpy_helper.from_array(absmax.astype(np.float32), f"{CALIBRATION_PREFIX}{name}.absmax"))
    props = graph_metadata(spec, quant, dtype, int4, embeddings) | (metadata or {})
    onnx.helper.set_model_props(proto, props)
    size = sum(len(t.raw_data) for t in proto.graph.initializer)
    use_external = size > EXTERNAL_DATA_BYTES if external_data is None else external_data
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=use_external,
        all_tensors_to_one_file=True,
        location=f"{path.name}.data",
        size_threshold=1024,
    )
    return path
