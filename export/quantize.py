"""4-bit weights for the decoder Linears: make them, and read them back as float.

Two routes, each a pair "quantise for the runtime / dequantise for the reference":

* NF4 (bitsandbytes, block 64) mapped byte for byte onto ``com.microsoft.MatMulBnb4``: both
  flatten the [N, K] weight row-major, pack the even flat index into the high nibble, use
  the same 16-entry NF4 code book and one absmax per 64 values (float; a double-quantised
  absmax is expanded first). Checked against ``bitsandbytes.functional.dequantize_4bit``.
* int4 ``com.microsoft.MatMulNBits`` through ONNX Runtime's ``MatMulNBitsQuantizer`` on the
  finished float graph: RTN (ORT's default block-wise affine quantiser), HQQ, or GPTQ (needs
  calibration token sequences). It has the faster CPU/CUDA kernels.

Embeddings and the LM head are never quantised: the head decides the ranking directly and
the embedding is a gather (no matmul to speed up); see :mod:`export.graph`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization.calibrate import CalibrationDataReader

NF4_BLOCK = 64
# bitsandbytes' NF4 code book (bitsandbytes.functional.get_4bit_type("nf4")), as float32
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=np.float32)


def nf4_absmax(state: Any) -> np.ndarray:
    """The float32 absmax [blocks] of a bitsandbytes QuantState, double quantisation expanded."""
    import bitsandbytes.functional as bnbf

    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return absmax.float().cpu().numpy()


def nf4_pack(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """weight [N, K] float -> (packed uint8 [N*K/2], absmax float32 [N*K/64]) with
    bitsandbytes ``quantize_4bit`` on CPU: the exact bytes ``MatMulBnb4`` reads."""
    import bitsandbytes.functional as bnbf
    import torch

    packed, state = bnbf.quantize_4bit(torch.from_numpy(np.ascontiguousarray(weight, np.float32)),
                                       blocksize=NF4_BLOCK, quant_type="nf4", compress_statistics=False)
    return packed.numpy().reshape(-1), nf4_absmax(state)


def nf4_unpack(packed: np.ndarray, absmax: np.ndarray, n: int, k: int, block: int = NF4_BLOCK) -> np.ndarray:
    """The float32 weight [N, K] that ``MatMulBnb4`` multiplies by (high nibble first)."""
    codes = np.stack([packed >> 4, packed & 0x0F], axis=-1).reshape(-1)[: n * k]
    scale = np.repeat(absmax.astype(np.float32), block)[: n * k]
    return (NF4_CODE[codes] * scale).reshape(n, k)


@dataclass(frozen=True)
class Int4Options:
    """MatMulNBits settings. ``calibration``: token-id sequences for GPTQ (each [T] int64).
    ``accuracy_level`` None keeps float32 activations (4 would quantise them to int8 on CPU)."""

    algo: Literal["rtn", "hqq", "gptq"] = "rtn"
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int | None = None
    calibration: tuple[np.ndarray, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"quant_type": "int4", "algo": self.algo, "block_size": self.block_size,
                "symmetric": self.symmetric, "accuracy_level": self.accuracy_level}


class _TokenReader(CalibrationDataReader):
    """GPTQ calibration feeds: each token sequence as a one-row first step (empty cache, plain
    causal mask for every kind: calibration text has no item segments)."""

    def __init__(self, model: onnx.ModelProto, sequences: tuple[np.ndarray, ...]) -> None:
        self.inputs = [(i.name, i.type.tensor_type) for i in model.graph.input]
        self.sequences = sequences
        self.position = 0  # an index, not a generator: the quantiser deep-copies the reader

    def rewind(self) -> None:
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.sequences):
            return None
        self.position += 1
        return self._feed(self.sequences[self.position - 1])

    def _feed(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        t = len(tokens)
        feed: dict[str, np.ndarray] = {}
        for name, tt in self.inputs:
            if name == "input_ids":
                feed[name] = np.asarray(tokens, np.int64)[None]
            elif name == "position_ids":
                feed[name] = np.arange(t, dtype=np.int64)[None]
            elif name == "logits_to_keep":
                feed[name] = np.array(0, np.int64)
            elif name.startswith("mask_"):
                feed[name] = np.tril(np.ones((t, t), bool))[None, None]
            else:  # empty past [1, kv, 0, D]
                dims = tt.shape.dim
                dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
                feed[name] = np.zeros((1, dims[1].dim_value, 0, dims[3].dim_value), dtype)
        return feed


def quantize_int4(model: onnx.ModelProto, options: Int4Options) -> onnx.ModelProto:
    """Every MatMul with a constant weight (the decoder Linears) -> MatMulNBits."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    from hatllm_edge.errors import InputError

    if options.algo == "rtn":
        config: Any = mnq.DefaultWeightOnlyQuantConfig(
            block_size=options.block_size, is_symmetric=options.symmetric, accuracy_level=options.accuracy_level)
    elif options.algo == "hqq":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=options.block_size, bits=4)
    elif options.algo == "gptq":
        if not options.calibration:
            raise InputError("int4 GPTQ needs calibration token sequences (Int4Options.calibration)")
        config = mnq.GPTQWeightOnlyQuantConfig(
            calibration_data_reader=_TokenReader(model, options.calibration), block_size=options.block_size)
    else:
        raise InputError(f"int4 algo {options.algo!r}: expected rtn, hqq or gptq")
    quantizer = mnq.MatMulNBitsQuantizer(
        model, bits=4, block_size=options.block_size, is_symmetric=options.symmetric,
        accuracy_level=options.accuracy_level, algo_config=config)
    level = logging.getLogger("onnxruntime.quantization").level
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # it logs every node at INFO
    try:
        quantizer.process()
    finally:
        logging.getLogger("onnxruntime.quantization").setLevel(level)
    return quantizer.model.model


def _unpack_low_first(packed: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """uint8 [rows, ceil(cols/2)] with the first value in the low nibble -> uint8 [rows, cols]."""
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, -1)[:, :cols]


def nbits_unpack(node: onnx.NodeProto, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The float32 weight [N, K] that a 4-bit ``MatMulNBits`` node multiplies by:
    (code - zero_point) * scale per block of K, codes packed low nibble first, zero point 8
    when absent; a float zero point (HQQ) is used as is."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
    if attrs.get("bits", 4) != 4:
        raise ValueError(f"{node.name}: only 4-bit MatMulNBits is read back")
    blocks = -(-k // block)
    codes = _unpack_low_first(arrays[node.input[1]].reshape(n, -1), n, blocks * block).astype(np.float32)
    scales = arrays[node.input[2]].astype(np.float32).reshape(n, blocks)
    zp_name = node.input[3] if len(node.input) > 3 else ""
    if not zp_name:
        zeros = np.full((n, blocks), 8.0, np.float32)
    elif arrays[zp_name].dtype == np.uint8:
        zeros = _unpack_low_first(arrays[zp_name].reshape(n, -1), n, blocks).astype(np.float32)
    else:
        zeros = arrays[zp_name].astype(np.float32).reshape(n, blocks)
    w = (codes.reshape(n, blocks, block) - zeros[..., None]) * scales[..., None]
    return w.reshape(n, blocks * block)[:, :k]


def _param_name(initializer: str) -> str:
    """``model.layers.0.mlp.up_proj.weight.T_Q4G32`` (any quantiser's suffix) -> ``...up_proj.weight``."""
    return initializer.split(".weight")[0] + ".weight"


def dequantized_linears(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Hugging Face parameter name (``model.layers.0.self_attn.q_proj.weight``) -> the float32
    [N, K] weight each 4-bit node of ``model`` really uses; empty for a float graph."""
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if node.op_type == "MatMulBnb4":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            out[_param_name(node.input[1])] = nf4_unpack(arrays[node.input[1]], arrays[node.input[2]], attrs["N"], attrs["K"],
                                   attrs["block_size"])
        elif node.op_type == "MatMulNBits":
            out[_param_name(node.input[1])] = nbits_unpack(node, arrays)
    return out
