"""NF4 (bitsandbytes, block 64) mapped byte for byte onto ``com.microsoft.MatMulBnb4``: both
flatten the [N, K] weight row-major, pack the even flat index into the high nibble, use the same
16-entry code book and one absmax per 64 values (float; a double-quantised absmax is expanded
first). Checked against ``bitsandbytes.functional.dequantize_4bit``; read back by
:mod:`hatllm_edge.engine.quant.nf4`."""

from __future__ import annotations

from typing import Any

import numpy as np

from hatllm_edge.engine.quant.nf4 import NF4_BLOCK


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
