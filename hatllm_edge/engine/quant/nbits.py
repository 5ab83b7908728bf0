"""``com.microsoft.MatMulNBits``, 4- or 8-bit: codes per block of K (4-bit packed low nibble
first), one scale per block, a zero point per block (``2^(bits-1)`` when absent, a float one
from HQQ used as is). Written by :mod:`hatllm_edge.export.quant.int4` (and the 8-bit Linears of
:mod:`hatllm_edge.engine.quant.q8`)."""

from __future__ import annotations

import numpy as np
import onnx

from hatllm_edge.engine.quant.attrs import node_attrs


def _unpack_low_first(packed: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """uint8 [rows, ceil(cols/2)] with the first value in the low nibble -> uint8 [rows, cols]."""
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, -1)[:, :cols]


def nbits_unpack(node: onnx.NodeProto, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The float32 weight [N, K] that a ``MatMulNBits`` node multiplies by:
    (code - zero_point) * scale per block of K; the zero point is 2^(bits-1) when absent, and
    a float zero point (HQQ) is used as is."""
    attrs = node_attrs(node)
    k, n, block, bits = attrs["K"], attrs["N"], attrs["block_size"], attrs.get("bits", 4)
    if bits not in (4, 8):
        raise ValueError(f"{node.name}: MatMulNBits with {bits} bits is not supported (4 or 8)")
    blocks = -(-k // block)
    raw = arrays[node.input[1]].reshape(n, -1)
    codes = (_unpack_low_first(raw, n, blocks * block) if bits == 4 else raw[:, : blocks * block]).astype(np.float32)
    scales = arrays[node.input[2]].astype(np.float32).reshape(n, blocks)
    zp_name = node.input[3] if len(node.input) > 3 else ""
    if not zp_name:
        zeros = np.full((n, blocks), 2.0 ** (bits - 1), np.float32)
    elif arrays[zp_name].dtype == np.uint8:
        zp = arrays[zp_name].reshape(n, -1)
        zeros = (_unpack_low_first(zp, n, blocks) if bits == 4 else zp[:, :blocks]).astype(np.float32)
    else:
        zeros = arrays[zp_name].astype(np.float32).reshape(n, blocks)
    w = (codes.reshape(n, blocks, block) - zeros[..., None]) * scales[..., None]
    return w.reshape(n, blocks * block)[:, :k]
