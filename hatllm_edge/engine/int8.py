"""The CPU engine's int8 route: every matmul with a constant weight (4-bit, 8-bit or float, LM
head included) rewritten, when the session loads, to signed int8 weights with one scale per
output channel and activations quantised per token, SmoothQuant folded in.

Why: on this class of CPU ONNX Runtime's 4-bit (and 8-bit block-wise) kernels dequantise to
float and run little faster than fp32, while u8 x s8 integer GEMMs use the VNNI int8 dot
products (3-4x fp32 at 1,200 rows, ``scripts/matmul_kernels.py``). So a bundle keeps its 4 bits
on disk, and the CPU engine expands every weight to signed int8 once, at load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from hatllm_edge.core.formats import LOGITS
from hatllm_edge.engine.quant import node_weight, param_name
from hatllm_edge.engine.quant.attrs import node_attrs

INT8_OP = "DynamicQuantizeMatMul"
# max |input| per channel of each Linear, measured at export (hatllm_edge.export.calibrate): graph
# initializers "calibration/<module>.absmax", read by the int8 rewrite's smoothing
CALIBRATION_PREFIX = "calibration/"
SMOOTH_ALPHA = 0.5  # SmoothQuant's migration strength (mean |int8 - native| score error 0.82 -> 0.56 nats at 0.5, 0.70 at 0.8)


def int8_per_channel(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float [N, K] -> (int8 [K, N] = round(W / s)^T, float32 scales [N]): symmetric, one scale
    per output channel, codes in [-127, 127] (the layout ``DynamicQuantizeMatMul`` reads)."""
    scale = np.abs(weight).max(axis=1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    codes = np.clip(np.rint(weight / scale[:, None]), -127, 127).astype(np.int8)
    return np.ascontiguousarray(codes.T), scale


Activations = Literal["row", "tensor"]


def int8_rows(a: str, codes: str, scale: str, out: str, name: str, k: int) -> list[onnx.NodeProto]:
    """y = a @ W^T with ``a`` [..., K] quantised per row (per token) to uint8 around 128 and
    the weights per output channel to int8: the u8 x s8 integer GEMM (VNNI), then the two
    scales. Per row, because a per-tensor scale (``DynamicQuantizeMatMul``) is set by the
    largest activation in the batch, which LLMs' outlier tokens make 100x the typical one, and
    because a token's result must not depend on what else is in the batch.

    Few passes over memory: the rounding is one blocked ``QuantizeLinear`` (block = K along the
    last axis, so one scale per row), and ``MatMulIntegerToFloat`` applies the channel scales
    inside the GEMM. The same codes as Div/Round/Add/Cast + MatMulInteger/Cast/Mul/Mul, 2.5x
    faster (the shapes of ``scripts/matmul_kernels.py``: 123 vs 49 ms)."""
    n = f"{name}/int8"
    return [
        helper.make_node("Abs", [a], [f"{n}/abs"], name=f"{n}/Abs"),
        helper.make_node("ReduceMax", [f"{n}/abs", "int8/axes"], [f"{n}/absmax"], name=f"{n}/ReduceMax", keepdims=1),
        helper.make_node("Max", [f"{n}/absmax", "int8/eps"], [f"{n}/absmax_eps"], name=f"{n}/Max"),
        helper.make_node("Mul", [f"{n}/absmax_eps", "int8/inv127"], [f"{n}/a_scale"], name=f"{n}/Scale"),  # [..., 1]
        helper.make_node("Shape", [f"{n}/a_scale"], [f"{n}/scale_shape"], name=f"{n}/Shape"),
        helper.make_node("Expand", ["int8/a_zero", f"{n}/scale_shape"], [f"{n}/a_zeros"], name=f"{n}/Expand"),
        helper.make_node("QuantizeLinear", [a, f"{n}/a_scale", f"{n}/a_zeros"], [f"{n}/a_u8"], name=f"{n}/Quantize",
                         axis=-1, block_size=k),  # round(a / scale) + 128, in [1, 255]
        # the integer product scaled per output channel in the GEMM's epilogue, then per row
        helper.make_node("MatMulIntegerToFloat", [f"{n}/a_u8", codes, "int8/one", scale, "int8/a_zero", "int8/b_zero"],
                         [f"{n}/channel_scaled"], name=f"{n}/MatMulIntegerToFloat", domain="com.microsoft"),
        helper.make_node("Mul", [f"{n}/channel_scaled", f"{n}/a_scale"], [out], name=f"{n}/MulRow"),
    ]


INT8_ROW_CONSTS = {
    "int8/axes": np.array([-1], np.int64), "int8/eps": np.array(1e-8, np.float32),
    "int8/inv127": np.array(1.0 / 127.0, np.float32), "int8/one": np.array(1.0, np.float32),
    "int8/a_zero": np.array(128, np.uint8), "int8/b_zero": np.array(0, np.int8),
}


@dataclass
class Smoothing:
    """SmoothQuant folded into the int8 graph: weight columns multiplied by ``columns[node]``,
    weight rows divided by ``rows[node]`` (a producer whose output channels feed a smoothed
    input), RMSNorm scale initializers replaced by ``norms[name]``."""

    columns: dict[str, np.ndarray] = field(default_factory=dict)
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    norms: dict[str, np.ndarray] = field(default_factory=dict)


def _module(node: onnx.NodeProto) -> str:
    """The Linear module a weight node computes (the tied head reads the embedding's weight)."""
    return "lm_head" if node.output[0] == LOGITS else param_name(node.input[1]).removesuffix(".weight")


def _factors(absmax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    """s = max|x|^a / max|w|^(1-a), scaled to a geometric mean of 1."""
    f = np.maximum(absmax, 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)
    return (f / np.exp(np.log(f).mean())).astype(np.float32)


def smoothing(model: onnx.ModelProto, arrays: dict[str, np.ndarray], weights: dict[str, np.ndarray],
              alpha: float = SMOOTH_ALPHA) -> Smoothing:
    """Where each smoothed matmul input's 1/s goes, so that no extra op runs: into the
    RMSNorm scale that produces it (q/k/v, gate/up; the LM head through its Slice), into the
    rows of v_proj for the attention output (o_proj; one factor per KV channel, shared by the
    query heads of its group) and into the rows of up_proj for the MLP product (down_proj).
    Inputs without calibration or with another producer stay as they are. Exact in float."""
    producer = {out: n for n in model.graph.node for out in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    plan = Smoothing()
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        if n.name in weights:
            readers.setdefault(n.input[0], []).append(n)

    def only_read_by(name: str, nodes: list[onnx.NodeProto]) -> bool:
        return {id(c) for c in consumers.get(name, [])} == {id(c) for c in nodes}

    for a, nodes in readers.items():
        stats = [arrays.get(f"{CALIBRATION_PREFIX}{_module(n)}.absmax") for n in nodes]
        src = producer.get(a)
        if src is None or any(x is None for x in stats) or not only_read_by(a, nodes):
            continue
        absmax = np.max(stats, axis=0)
        wmax = np.max([np.abs(weights[n.name]).max(axis=0) for n in nodes], axis=0)
        norm = src
        if src.op_type == "Slice" and src.input[0] in producer and only_read_by(src.input[0], [src]):
            norm = producer[src.input[0]]
        if norm.op_type == "RMSNormalization" and norm.input[1] in arrays and norm.input[1] not in plan.norms:
            f = _factors(absmax, wmax, alpha)
            plan.norms[norm.input[1]] = (arrays[norm.input[1]] / f).astype(np.float32)
        elif src.op_type == "Attention" and src.input[2] in producer and producer[src.input[2]].name in weights \
                and only_read_by(src.input[2], [src]):
            attrs = node_attrs(src)
            heads, kv = attrs["q_num_heads"], attrs["kv_num_heads"]
            group = lambda v: v.reshape(kv, heads // kv, -1).max(axis=1)  # noqa: E731  [heads*dim] -> [kv, dim]
            f_kv = _factors(group(absmax), group(wmax), alpha)
            f = np.repeat(f_kv, heads // kv, axis=0).reshape(-1)
            plan.rows[producer[src.input[2]].name] = f_kv.reshape(-1)
        elif src.op_type == "Mul":
            up = [producer[i] for i in src.input if i in producer and producer[i].name in weights and only_read_by(i, [src])]
            if not up:
                continue
            f = _factors(absmax, wmax, alpha)
            plan.rows[up[0].name] = f
        else:
            continue
        for n in nodes:
            plan.columns[n.name] = f
    return plan


def int8_compute(model: onnx.ModelProto, activations: Activations = "row") -> tuple[onnx.ModelProto, int]:
    """``model`` with every matmul that has a constant weight (4-bit, 8-bit or float, LM head
    included) computed in int8: signed int8 weights with one scale per output channel, and
    activations quantised at run time per row (:func:`int8_rows`) or per tensor
    (``DynamicQuantizeMatMul``: one op, but see ``int8_rows`` for its cost in ranking
    quality). Per row, a graph exported with activation statistics is first smoothed
    (:func:`smoothing`: SmoothQuant folded into the norms and producer weights, no extra op).
    Weights no longer used are dropped. Returns the model and how many nodes changed."""
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weights = {n.name: w for n in model.graph.node if (w := node_weight(n, arrays)) is not None}
    plan = smoothing(model, arrays, weights) if activations == "row" else Smoothing()
    nodes: list[onnx.NodeProto] = []
    new_inits = [numpy_helper.from_array(v, f"{k}/smoothed") for k, v in plan.norms.items()]
    changed = 0
    for node in model.graph.node:
        weight = weights.get(node.name)
        if weight is None:
            if node.op_type == "RMSNormalization" and node.input[1] in plan.norms:
                node = helper.make_node(node.op_type, [node.input[0], f"{node.input[1]}/smoothed", *node.input[2:]],
                                        list(node.output), name=node.name, domain=node.domain, **node_attrs(node))
            nodes.append(node)
            continue
        if node.name in plan.columns:
            weight = weight * plan.columns[node.name][None, :]
        if node.name in plan.rows:
            weight = weight / plan.rows[node.name][:, None]
        base = param_name(node.input[1])
        codes, scale = int8_per_channel(weight)
        a = node.input[0]
        new_inits += [numpy_helper.from_array(codes, f"{base}.int8"), numpy_helper.from_array(scale, f"{base}.int8_scale")]
        if node.op_type == "MatMulNBits" and len(node.input) > 5 and node.input[5]:
            raise ValueError(f"{node.name}: MatMulNBits with a bias input is not rewritten (the exporter adds biases apart)")
        if activations == "row":
            nodes += int8_rows(a, f"{base}.int8", f"{base}.int8_scale", node.output[0], node.name, weight.shape[1])
        else:
            nodes.append(helper.make_node(INT8_OP, [a, f"{base}.int8", f"{base}.int8_scale"], list(node.output),
                                          name=f"{node.name}/{INT8_OP}", domain="com.microsoft"))
        changed += 1
    if activations == "row" and changed:
        new_inits += [numpy_helper.from_array(v, k) for k, v in INT8_ROW_CONSTS.items()]
    used = {name for n in nodes for name in n.input}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    kept = [t for t in model.graph.initializer if t.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept + new_inits)
    if not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return out, changed


def block_compute(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``model`` with every ``MatMulNBits`` on ONNX Runtime's own int8 kernels (``accuracy_level``
    4): the stored 4- or 8-bit weights unchanged, activations quantised at run time per row and
    per block of the weight's block size along K (finer than :func:`int8_rows`' one scale per
    token). Without it ONNX Runtime's CPU kernel dequantises the whole weight at every call: for
    Gemma 3's 8-bit LM head, 262,144 x 640 floats a pass. Other matmuls stay as stored. Returns
    the model and how many nodes changed."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    changed = 0
    for node in out.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, helper.make_attribute("accuracy_level", 4)])
            changed += 1
    return out, changed
