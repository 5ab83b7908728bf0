"""NF4, the bitsandbytes 4-bit format, as ``com.microsoft.MatMulBnb4`` stores it: the [N, K]
weight flattened row-major, the even flat index in the high nibble, bitsandbytes' 16-entry
code book and one float absmax per block of 64 (written by :mod:`hatllm_edge.export.quant.nf4`)."""

from __future__ import annotations

import numpy as np

NF4_BLOCK = 64
# bitsandbytes' NF4 code book (bitsandbytes.functional.get_4bit_type("nf4")), as float32
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=np.float32)


def nf4_unpack(packed: np.ndarray, absmax: np.ndarray, n: int, k: int, block: int = NF4_BLOCK) -> np.ndarray:
    """The float32 weight [N, K] that ``MatMulBnb4`` multiplies by (high nibble first)."""
    codes = np.stack([packed >> 4, packed & 0x0F], axis=-1).reshape(-1)[: n * k]
    scale = np.repeat(absmax.astype(np.float32), block)[: n * k]
    return (NF4_CODE[codes] * scale).reshape(n, k)
