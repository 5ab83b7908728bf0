"""8-bit blocks: symmetric absmax per block of 64, code = round(w / scale) + 128, the layout of
an 8-bit ``MatMulNBits`` weight without zero points. The ``--quant int8`` Linears use it, and
every quantised bundle stores its tied embedding / LM head this way (``<param>.q8`` +
``<param>.scales``), once: the head decides the ranking directly, so it gets 8 bits, not 4, and
the embedding gathers from the same codes. Packing and unpacking live together here because
the exporter and the engine both need them and neither may need torch."""

from __future__ import annotations

import numpy as np

Q8_BLOCK = 64


def q8_pack(weight: np.ndarray, block: int = Q8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """weight [N, K] float -> (codes uint8 [N, K/block, block], scales float32 [N, K/block]):
    symmetric absmax per block, code = round(w / scale) + 128. The layout of an 8-bit
    ``MatMulNBits`` weight without zero points, and what the 8-bit embedding gathers from."""
    n, k = weight.shape
    if k % block:
        raise ValueError(f"8-bit blocks of {block} need K divisible by {block}, got K={k}")
    blocks = weight.reshape(n, k // block, block).astype(np.float32)
    scales = np.abs(blocks).max(axis=-1) / 127.0
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    codes = np.clip(np.rint(blocks / scales[..., None]), -127, 127) + 128
    return codes.astype(np.uint8), scales


def q8_unpack(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """An 8-bit block-quantised matrix (``<param>.q8`` [N, blocks, block] uint8, zero point 128,
    ``<param>.scales`` [N, blocks]) as float32 [N, blocks * block]."""
    n = codes.shape[0]
    return ((codes.astype(np.float32) - 128.0) * scales.reshape(n, -1, 1)).reshape(n, -1)
