"""Low-bit weights inside an exported graph, read back as the float weights they stand for: one
module per format (:mod:`.nf4`, :mod:`.nbits`, :mod:`.q8`), each the decoder of its exporter
in :mod:`hatllm_edge.export.quant`. Export validation compares against these weights, and the
CPU engine's int8 route (:mod:`hatllm_edge.engine.int8`) re-quantises from them. A new format
adds its module here, its exporter there, and one branch to :func:`node_weight`."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from hatllm_edge.engine.quant.attrs import node_attrs
from hatllm_edge.engine.quant.nbits import nbits_unpack
from hatllm_edge.engine.quant.nf4 import nf4_unpack
from hatllm_edge.engine.quant.q8 import q8_unpack


def param_name(initializer: str) -> str:
    """``model.layers.0.mlp.up_proj.weight.T_Q4G32`` (any quantiser's suffix) -> ``...up_proj.weight``."""
    return initializer.split(".weight")[0] + ".weight"


def node_weight(node: onnx.NodeProto, arrays: dict[str, np.ndarray]) -> np.ndarray | None:
    """The float32 weight [N, K] a matmul-like node multiplies by (y = x W^T), or None when the
    node has no constant weight: MatMulBnb4, MatMulNBits, MatMul with a constant [K, N]
    right side, Gemm with a constant right side (the LM head)."""
    if node.op_type == "MatMulBnb4":
        attrs = node_attrs(node)
        return nf4_unpack(arrays[node.input[1]], arrays[node.input[2]], attrs["N"], attrs["K"], attrs["block_size"])
    if node.op_type == "MatMulNBits":
        return nbits_unpack(node, arrays)
    if node.op_type in ("MatMul", "Gemm") and node.input[1] in arrays:
        attrs = node_attrs(node)
        if node.op_type == "Gemm" and (attrs.get("transA", 0) or len(node.input) > 2 or attrs.get("alpha", 1.0) != 1.0):
            return None
        w = arrays[node.input[1]].astype(np.float32)
        if w.ndim != 2:
            return None
        return w if node.op_type == "Gemm" and attrs.get("transB", 0) else w.T
    return None


def dequantized_linears(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Hugging Face parameter name (``model.layers.0.self_attn.q_proj.weight``) -> the float32
    [N, K] weight each low-bit node (and the 8-bit embedding) of ``model`` really uses; empty
    for a float graph."""
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if node.op_type in ("MatMulBnb4", "MatMulNBits"):
            out[param_name(node.input[1])] = node_weight(node, arrays)
        elif node.op_type == "Gather" and node.input[0].endswith(".q8"):
            name = node.input[0].removesuffix(".q8")
            out.setdefault(name, q8_unpack(arrays[node.input[0]], arrays[f"{name}.scales"]))
    return out
