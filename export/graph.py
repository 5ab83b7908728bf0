"""The ONNX graph of a Llama/Qwen2/Gemma3 decoder with one HatLLM mask input per mask kind.

Graph contract (all of B, Q, P dynamic; P may be 0 for the first step):

* inputs: ``input_ids``, ``position_ids`` [B, Q] int64; ``mask_{kind}`` bool [B, 1, Q, P+Q]
  (True = may attend) for every kind the schedule uses; ``past_key_values.{i}.key/value``
  [B_past, kv_heads, P, head_dim] and ``past_rows`` [B] int64: row b of the step continues
  row ``past_rows[b]`` of the past cache, gathered inside the graph (a beam step reorders its
  parents, a candidate pass repeats its users' prompts, in the same run; the identity when
  nothing moves); ``logits_to_keep`` int64 scalar (0 = every position; n > 0
  keeps the last n positions, so a prefill that needs one next-token distribution skips the
  [Q, V] LM-head product). It is a plain required input, not an overridable initializer with
  a default: ONNX Runtime's IOBinding cannot bind overridable initializers.
  ``target_ids`` [B, Q, C] int64: the C tokens whose log-probabilities each position should
  report (candidate scoring reads only these: the next token, and for a renormalised score
  the trie node's allowed tokens; any id, e.g. 0, where no score is needed).
  ``key_positions`` [B, P+Q] int64, only where some layer slides (Gemma3): the positions of
  the keys each row attends (its past row's, then ``position_ids``), which the sliding window
  counts back on (:func:`hatllm_edge.core.masks.sliding_band`).
* outputs: ``logits`` [B, Q', V] float32 (Q' = Q or ``logits_to_keep``);
  ``target_logprobs`` [B, Q', C] float32, log softmax(logits)[targets] computed in the
  graph, so a scoring pass hands back Q' x C floats instead of Q' x V logits; and
  ``present.{i}.key/value`` [B, kv_heads, P+Q, head_dim] in the graph dtype.

Ops: the opset-23 standard ``RMSNormalization``, ``RotaryEmbedding`` (3-D input with
``num_heads``, cos/sin computed once from ``position_ids``) and ``Attention`` (GQA through
``q_num_heads``/``kv_num_heads``, the boolean mask, past/present concatenation inside the op).
ONNX Runtime 1.31 runs all three on CPU and matches PyTorch to ~2e-7 (checked with GQA,
random boolean masks and P in {0, 1, 4}); the fused op keeps the graph free of the
repeat_interleave/transposes a hand-written attention would need. ``fp16``: weights,
activations and the cache in float16, RMSNorm statistics in float32 (``stash_type``), the
logits cast to float32 at the end so that the ranking code reads one dtype. A Gemma3 decoder
adds ``Gelu`` (tanh), per-head ``RMSNormalization`` of q and k, a second RoPE table, and on its
local layers the mask input ANDed with the sliding window (built once from ``position_ids`` and
``key_positions``), so the contract is the same for every family but for that one input.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hatllm_edge.core.errors import InputError
from hatllm_edge.core.formats import (
    INPUT_IDS,
    KEY_POSITIONS,
    LOGITS,
    LOGITS_TO_KEEP,
    MASK_INPUT,
    PAST,
    PAST_ROWS,
    POSITION_IDS,
    PRESENT,
    TARGET_IDS,
    TARGET_LOGPROBS,
    Embeddings,
)
from hatllm_edge.engine.quant.nf4 import NF4_BLOCK
from hatllm_edge.engine.quant.q8 import Q8_BLOCK, q8_pack
from hatllm_edge.export.quant.nf4 import nf4_pack
from hatllm_edge.export.spec import DecoderSpec

INT64_MAX = np.iinfo(np.int64).max
LinearQuant = Literal["none", "nf4", "int8"]


class _Graph:
    """Collects nodes and initializers; every node gets a path-style name and its output is
    ``<name>/output_0`` (the onnxruntime-genai builder's convention)."""

    def __init__(self, dtype: Literal["fp32", "fp16"]) -> None:
        self.np_dtype = np.float16 if dtype == "fp16" else np.float32
        self.onnx_dtype = TensorProto.FLOAT16 if dtype == "fp16" else TensorProto.FLOAT
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.uses_contrib = False

    def const(self, name: str, value: np.ndarray) -> str:
        if name not in self.initializers:
            self.initializers[name] = numpy_helper.from_array(np.require(value, requirements="C"), name)
        return name

    def weight(self, name: str, value: np.ndarray) -> str:
        """A float weight in the graph dtype."""
        return self.const(name, value.astype(self.np_dtype))

    def op(self, op_type: str, inputs: list[str], name: str, outputs: list[str] | None = None,
           domain: str = "", **attrs: object) -> str:
        outputs = outputs or [f"{name}/output_0"]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain, **attrs))
        self.uses_contrib |= domain == "com.microsoft"
        return outputs[0]


def _q8_block(k: int) -> int:
    for block in (Q8_BLOCK, 32, 16):
        if k % block == 0:
            return block
    raise InputError(f"8-bit weights need an input size divisible by 16, got {k}")


def _q8_consts(g: _Graph, param: str, w: np.ndarray) -> tuple[str, str, int]:
    """The 8-bit codes ``<param>.q8`` [N, K/block, block] and ``<param>.scales`` [N, K/block]
    of W [N, K], packed once however many nodes read them."""
    block = _q8_block(w.shape[1])
    codes, scales = f"{param}.q8", f"{param}.scales"
    if codes not in g.initializers:
        packed, block_scales = q8_pack(w, block)
        g.const(codes, packed)
        g.weight(scales, block_scales)
    return codes, scales, block


def _matmul_q8(g: _Graph, x: str, param: str, w: np.ndarray, node: str, outputs: list[str] | None = None) -> str:
    """x [..., K] @ W^T with W [N, K] as 8-bit ``MatMulNBits``."""
    codes, scales, block = _q8_consts(g, param, w)
    return g.op("MatMulNBits", [x, codes, scales], f"{node}/MatMulNBits", outputs=outputs, domain="com.microsoft",
                K=w.shape[1], N=w.shape[0], bits=8, block_size=block)


def _linear(g: _Graph, spec: DecoderSpec, x: str, path: str, quant: LinearQuant) -> str:
    """x [B, Q, K] -> [B, Q, N] for the Linear at ``path`` (weight [N, K])."""
    node = "/" + path.replace(".", "/").replace("/layers/", "/layers.").replace("self_attn", "attn")
    w = spec.weights[f"{path}.weight"]
    if quant == "int8":
        out = _matmul_q8(g, x, f"{path}.weight", w, node)
    elif quant == "nf4":
        packed, absmax = nf4_pack(w)
        out = g.op("MatMulBnb4",
                   [x, g.const(f"{path}.weight.nf4", packed), g.weight(f"{path}.weight.absmax", absmax)],
                   f"{node}/MatMulBnb4", domain="com.microsoft",
                   K=w.shape[1], N=w.shape[0], block_size=NF4_BLOCK, quant_type=1)
    else:
        # the initializer holds W^T [K, N], so MatMulNBitsQuantizer later finds a plain MatMul
        out = g.op("MatMul", [x, g.weight(f"{path}.weight.T", w.T)], f"{node}/MatMul")
    bias = spec.weights.get(f"{path}.bias")
    if bias is not None:
        out = g.op("Add", [out, g.weight(f"{path}.bias", bias)], f"{node}/BiasAdd")
    return out


def _rms_norm(g: _Graph, spec: DecoderSpec, x: str, weight: str, node: str) -> str:
    return g.op("RMSNormalization", [x, g.weight(weight, spec.weights[weight])], f"{node}/RMSNormalization",
                axis=-1, epsilon=spec.rms_norm_eps, stash_type=1)


def _rope_tables(g: _Graph, spec: DecoderSpec) -> list[tuple[str, str]]:
    """cos, sin [B, Q, head_dim/2] from position_ids for each of the model's RoPE tables, as
    Hugging Face computes them (float32 position x inv_freq, then x attention_scaling)."""
    pos = g.op("Cast", [POSITION_IDS], "/model/rope/Cast", to=TensorProto.FLOAT)
    pos = g.op("Unsqueeze", [pos, g.const("/model/rope/axes", np.array([-1], np.int64))], "/model/rope/Unsqueeze")
    out = []
    for t, rope in enumerate(spec.ropes):
        node, param = ("/model/rope", "model.rotary_emb") if t == 0 else (f"/model/rope.{t}", f"model.rotary_emb.{t}")
        freqs = g.op("Mul", [pos, g.const(f"{param}.inv_freq", rope.inv_freq)], f"{node}/Mul")
        tables = []
        for fn in ("Cos", "Sin"):
            table = g.op(fn, [freqs], f"{node}/{fn}")
            if rope.scaling != 1.0:
                scale = g.const(f"{param}.attention_scaling", np.array(rope.scaling, np.float32))
                table = g.op("Mul", [table, scale], f"{node}/{fn}/Scale")
            if g.np_dtype is np.float16:
                table = g.op("Cast", [table], f"{node}/{fn}/Cast", to=TensorProto.FLOAT16)
            tables.append(table)
        out.append((tables[0], tables[1]))
    return out


def _sliding_band(g: _Graph, spec: DecoderSpec) -> str:
    """[B, 1, Q, P+Q] bool: a query sees a key fewer than ``sliding_window`` positions back
    (:func:`hatllm_edge.core.masks.sliding_band`)."""
    node = "/model/sliding"
    queries = g.op("Unsqueeze", [POSITION_IDS, g.const(f"{node}/query_axes", np.array([1, 3], np.int64))],
                   f"{node}/queries/Unsqueeze")  # [B, 1, Q, 1]
    keys = g.op("Unsqueeze", [KEY_POSITIONS, g.const(f"{node}/key_axes", np.array([1, 2], np.int64))],
                f"{node}/keys/Unsqueeze")  # [B, 1, 1, P+Q]
    back = g.op("Sub", [queries, keys], f"{node}/back/Sub")
    return g.op("Less", [back, g.const(f"{node}/window", np.array(spec.sliding_window, np.int64))], f"{node}/Less")


def _head_norm(g: _Graph, spec: DecoderSpec, x: str, weight: str, heads: int, node: str) -> str:
    """RMSNorm over each head's ``head_dim`` of x [B, Q, heads * D] (Gemma3's q_norm/k_norm)."""
    split = g.op("Reshape", [x, g.const(f"/model/heads_{heads}", np.array([0, 0, heads, spec.head_dim], np.int64))],
                 f"{node}/Reshape")
    normed = _rms_norm(g, spec, split, weight, node)
    return g.op("Reshape", [normed, g.const("/model/merge_heads", np.array([0, 0, -1], np.int64))], f"{node}/merge/Reshape")


def _layer(g: _Graph, spec: DecoderSpec, i: int, h: str, rope: tuple[str, str], mask: str, quant: LinearQuant,
           eight_bit: tuple[str, ...] = ()) -> str:
    """One decoder layer; ``h`` [B, Q, hidden] is the residual stream.

        h ─ RMSNorm ─ q,k,v ─ RoPE(q,k) ─ Attention(mask, past[past_rows]) ─ o_proj ─ (+h) ─┐
        ┌───────────────────────────────────────────────────────────────────────────────┘
        └─ RMSNorm ─ gate, up ─ SiLU(gate) * up ─ down_proj ─ (+) ─> h

    Gemma3 adds an RMSNorm after o_proj and after down_proj, one on each head of q and k before
    RoPE, GELU (tanh) for SiLU, and on its local layers the sliding window on the mask.
    """
    p, node = f"model.layers.{i}", f"/model/layers.{i}"
    cos, sin = rope

    def linear(x: str, name: str) -> str:
        return _linear(g, spec, x, f"{p}.{name}", "int8" if name in eight_bit else quant)

    def norm(x: str, name: str) -> str:
        return _rms_norm(g, spec, x, f"{p}.{name}.weight", f"{node}/{name}")

    x = norm(h, "input_layernorm")
    q = linear(x, "self_attn.q_proj")  # [B, Q, H * D]
    k = linear(x, "self_attn.k_proj")  # [B, Q, KV * D]
    v = linear(x, "self_attn.v_proj")
    if spec.qk_norm:
        q = _head_norm(g, spec, q, f"{p}.self_attn.q_norm.weight", spec.num_heads, f"{node}/attn/q_norm")
        k = _head_norm(g, spec, k, f"{p}.self_attn.k_norm.weight", spec.num_kv_heads, f"{node}/attn/k_norm")
    q = g.op("RotaryEmbedding", [q, cos, sin], f"{node}/attn/q_rotary/RotaryEmbedding", num_heads=spec.num_heads)
    k = g.op("RotaryEmbedding", [k, cos, sin], f"{node}/attn/k_rotary/RotaryEmbedding", num_heads=spec.num_kv_heads)
    past = [g.op("Gather", [PAST.format(i, part), PAST_ROWS], f"{node}/attn/past_{part}/Gather", axis=0)
            for part in ("key", "value")]  # [B, KV, P, D]: the rows this step continues
    y = g.op(
        "Attention",
        [q, k, v, mask, *past],
        f"{node}/attn/Attention",
        outputs=[f"{node}/attn/Attention/output_0", PRESENT.format(i, "key"), PRESENT.format(i, "value")],
        q_num_heads=spec.num_heads, kv_num_heads=spec.num_kv_heads, scale=spec.attn_scale, is_causal=0,
    )  # [B, Q, H * D]
    y = linear(y, "self_attn.o_proj")
    if spec.sandwich_norms:
        y = norm(y, "post_attention_layernorm")
    h = g.op("Add", [h, y], f"{node}/attn/residual/Add")
    x = norm(h, "pre_feedforward_layernorm" if spec.sandwich_norms else "post_attention_layernorm")
    gate = linear(x, "mlp.gate_proj")
    up = linear(x, "mlp.up_proj")
    if spec.activation == "gelu_tanh":
        act = g.op("Gelu", [gate], f"{node}/mlp/act/Gelu", approximate="tanh")
    else:
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{node}/mlp/act/Sigmoid")], f"{node}/mlp/act/Mul")
    act = g.op("Mul", [act, up], f"{node}/mlp/Mul")
    y = linear(act, "mlp.down_proj")
    if spec.sandwich_norms:
        y = norm(y, "post_feedforward_layernorm")
    return g.op("Add", [h, y], f"{node}/mlp/residual/Add")


def _embed(g: _Graph, spec: DecoderSpec, embeddings: Embeddings) -> str:
    """input_ids -> [B, Q, hidden], times the model's embedding scale (Gemma3: sqrt(hidden))."""
    rows = _embed_rows(g, spec, embeddings)
    if spec.embed_scale == 1.0:
        return rows
    return g.op("Mul", [rows, g.weight("model.embed_tokens.embed_scale", np.array(spec.embed_scale))],
                "/model/embed_tokens/Scale")


def _embed_rows(g: _Graph, spec: DecoderSpec, embeddings: Embeddings) -> str:
    """The embedding rows. ``int8``: gathered from the 8-bit codes that the tied LM head's
    ``MatMulNBits`` also reads (one copy on disk): (code - 128) * block scale."""
    name = "model.embed_tokens.weight"
    if embeddings == "float":
        return g.op("Gather", [g.weight(name, spec.weights[name]), INPUT_IDS], "/model/embed_tokens/Gather")
    codes, scales, _ = _q8_consts(g, name, spec.weights[name])
    node = "/model/embed_tokens"
    rows = g.op("Gather", [codes, INPUT_IDS], f"{node}/Gather")  # [B, Q, nb, block]
    rows = g.op("Cast", [rows], f"{node}/Cast", to=g.onnx_dtype)
    rows = g.op("Sub", [rows, g.weight(f"{node}/zero_point", np.array(128.0))], f"{node}/Sub")
    scale = g.op("Gather", [scales, INPUT_IDS], f"{node}/scales/Gather")  # [B, Q, nb]
    scale = g.op("Unsqueeze", [scale, g.const(f"{node}/axes", np.array([-1], np.int64))], f"{node}/Unsqueeze")
    rows = g.op("Mul", [rows, scale], f"{node}/Mul")
    return g.op("Reshape", [rows, g.const(f"{node}/shape", np.array([0, 0, spec.hidden_size], np.int64))],
                f"{node}/Reshape")


def _lm_head(g: _Graph, spec: DecoderSpec, h: str, embeddings: Embeddings) -> str:
    """Final norm, keep the last ``logits_to_keep`` positions, then logits [B, Q', V] and the
    targets' log-probabilities [B, Q'].

    Float: Gemm with transB reads the [V, hidden] matrix in place, so tied embeddings are
    stored once and the int4 quantiser (which only rewrites MatMul) leaves the head alone.
    ``int8``: an 8-bit ``MatMulNBits`` over the same codes the embedding gathers from.
    """
    x = _rms_norm(g, spec, h, "model.norm.weight", "/model/norm")
    keep = g.op("Reshape", [LOGITS_TO_KEEP, g.const("/lm_head/one", np.array([1], np.int64))], "/lm_head/keep/Reshape")
    start = g.op("Neg", [keep], "/lm_head/keep/Neg")  # -0 = 0: every position
    end, axis = g.const("/lm_head/end", np.array([INT64_MAX], np.int64)), g.const("/lm_head/axis", np.array([1], np.int64))
    x = g.op("Slice", [x, start, end, axis], "/lm_head/keep/Slice")
    targets = g.op("Slice", [TARGET_IDS, start, end, axis], "/lm_head/targets/Slice")
    head = "model.embed_tokens.weight" if spec.tied_embeddings else "lm_head.weight"
    if embeddings == "int8":  # MatMulNBits takes [B, Q', hidden] as is: no reshape, so no copy of the logits
        if g.np_dtype is np.float16:
            logits = _matmul_q8(g, x, head, spec.weights[head], "/lm_head")
            logits = g.op("Cast", [logits], "/lm_head/Cast", to=TensorProto.FLOAT, outputs=[LOGITS])
        else:
            logits = _matmul_q8(g, x, head, spec.weights[head], "/lm_head", outputs=[LOGITS])
    else:
        lead = g.op("Shape", [x], "/lm_head/Shape", end=2)  # [B, Q']
        flat = g.op("Reshape", [x, g.const("/lm_head/flat", np.array([-1, spec.hidden_size], np.int64))], "/lm_head/Reshape")
        logits = g.op("Gemm", [flat, g.weight(head, spec.weights[head])], "/lm_head/Gemm", transB=1)
        if g.np_dtype is np.float16:
            logits = g.op("Cast", [logits], "/lm_head/Cast", to=TensorProto.FLOAT)
        shape = g.op("Concat", [lead, g.const("/lm_head/vocab", np.array([spec.vocab_size], np.int64))],
                     "/lm_head/Concat", axis=0)
        logits = g.op("Reshape", [logits, shape], "/lm_head/output/Reshape", outputs=[LOGITS])

    # LogSoftmax, then pick: 4x faster on the CPU than ReduceLogSumExp (vectorised exp)
    logprobs = g.op("LogSoftmax", [logits], "/lm_head/LogSoftmax", axis=-1)  # [B, Q', V]
    return g.op("GatherElements", [logprobs, targets], "/lm_head/targets/GatherElements", axis=2,
                outputs=[TARGET_LOGPROBS])  # [B, Q', C]


def build_decoder(spec: DecoderSpec, quant: LinearQuant = "none", dtype: Literal["fp32", "fp16"] = "fp32",
                  opset: int = 23, embeddings: Embeddings = "float", eight_bit: tuple[str, ...] = ()) -> onnx.ModelProto:
    """The whole decoder as a ModelProto (weights inline; :func:`hatllm_edge.export.convert.export_onnx`
    saves it). ``quant``: the decoder Linears (float ``MatMul``, NF4 or 8-bit); ``eight_bit``:
    Linears (``mlp.down_proj``, ...) written 8-bit whatever ``quant`` says; ``embeddings``: the
    embedding and LM head in the graph dtype or 8-bit."""
    g = _Graph(dtype)
    h = _embed(g, spec, embeddings)
    ropes = _rope_tables(g, spec)
    masks = [MASK_INPUT.format(kind) for kind in spec.layer_kinds]
    slid = dict.fromkeys(kind for kind, slides in zip(spec.layer_kinds, spec.layer_sliding) if slides)
    band = _sliding_band(g, spec) if slid else None
    sliding = {kind: g.op("And", [MASK_INPUT.format(kind), band], f"/model/sliding_{kind}/And") for kind in slid}
    for i in range(spec.num_layers):
        mask = sliding[spec.layer_kinds[i]] if spec.layer_sliding and spec.layer_sliding[i] else masks[i]
        h = _layer(g, spec, i, h, ropes[spec.layer_rope[i]], mask, quant, eight_bit)
    _lm_head(g, spec, h, embeddings)

    kv_shape = ["past_batch", spec.num_kv_heads, "past_sequence", spec.head_dim]
    present_shape = ["batch", spec.num_kv_heads, "total_sequence", spec.head_dim]
    inputs = [
        helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info(POSITION_IDS, TensorProto.INT64, ["batch", "sequence"]),
    ]
    for kind in dict.fromkeys(spec.layer_kinds):
        inputs.append(helper.make_tensor_value_info(
            MASK_INPUT.format(kind), TensorProto.BOOL, ["batch", 1, "sequence", "total_sequence"]))
    outputs = [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", "logits_sequence", spec.vocab_size]),
               helper.make_tensor_value_info(TARGET_LOGPROBS, TensorProto.FLOAT, ["batch", "logits_sequence", "targets"])]
    for i in range(spec.num_layers):
        for part in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(PAST.format(i, part), g.onnx_dtype, kv_shape))
            outputs.append(helper.make_tensor_value_info(PRESENT.format(i, part), g.onnx_dtype, present_shape))
    inputs.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, []))
    inputs.append(helper.make_tensor_value_info(TARGET_IDS, TensorProto.INT64, ["batch", "sequence", "targets"]))
    inputs.append(helper.make_tensor_value_info(PAST_ROWS, TensorProto.INT64, ["batch"]))
    if slid:
        inputs.append(helper.make_tensor_value_info(KEY_POSITIONS, TensorProto.INT64, ["batch", "total_sequence"]))

    graph = helper.make_graph(g.nodes, "hatllm_decoder", inputs, outputs, initializer=list(g.initializers.values()))
    opsets = [helper.make_opsetid("", opset)]
    if g.uses_contrib:
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="hatllm-edge")
    model.ir_version = helper.find_min_ir_version_for(opsets[:1])
    return model
