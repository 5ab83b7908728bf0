"""Which ONNX Runtime matmul kernel is fast on this CPU? The measurement behind the engine's
int8 expansion (docs/results.md, "How the engine computes").

16 chained 576x1536 / 1536x576 matmuls (SmolLM2-135M's MLP shapes) over ROWS rows, each
kernel with the same seeded weights: fp32 MatMul, MatMulNBits 4- and 8-bit (block 32/64,
accuracy levels 0 and 4), DynamicQuantizeMatMul (int8 weights, per-tensor activations) and
the engine's per-token u8 x s8 route (blocked QuantizeLinear + MatMulIntegerToFloat). Prints
the mean of 5 runs after a warm-up, and whether ONNX Runtime set up its AMX int8 GEMM here (on a
CPU with AMX, the int8 rows are then about twice as fast: docs/results.md, "On an Intel CPU
with AMX").

    python scripts/matmul_kernels.py --rows 1200 --threads 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from hatllm_edge.core.machine import amx_tiles_granted, cpu_flags, cpu_name
from hatllm_edge.engine.int8 import INT8_ROW_CONSTS, int8_per_channel, int8_rows
from hatllm_edge.engine.quant.q8 import q8_pack

SHAPES = [(1536, 576) if i % 2 == 0 else (576, 1536) for i in range(16)]  # weight [N, K]


def _nbits(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric block codes in MatMulNBits' layout (zero point 2^(bits-1) implied)."""
    if bits == 8:
        return q8_pack(w, block)
    n, k = w.shape
    blocks = w.reshape(n, k // block, block)
    scales = (np.abs(blocks).max(-1) / 7).astype(np.float32)
    codes = (np.clip(np.rint(blocks / scales[..., None]), -8, 7) + 8).astype(np.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8), scales


def build(kind: str, weights: list[np.ndarray]) -> bytes:
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    x = "x"
    for i, w in enumerate(weights):
        n, k = w.shape
        y = f"y{i}"
        if kind == "fp32":
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{i}"))
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [y]))
        elif kind.startswith("nbits"):
            _, bits, block, level = kind.split("-")
            codes, scales = _nbits(w, int(bits), int(block))
            inits += [numpy_helper.from_array(codes, f"w{i}"), numpy_helper.from_array(scales, f"s{i}")]
            nodes.append(helper.make_node("MatMulNBits", [x, f"w{i}", f"s{i}"], [y], domain="com.microsoft",
                                          K=k, N=n, bits=int(bits), block_size=int(block), accuracy_level=int(level)))
        else:
            codes, scale = int8_per_channel(w)
            inits += [numpy_helper.from_array(codes, f"w{i}"), numpy_helper.from_array(scale, f"s{i}")]
            if kind == "int8-tensor":
                nodes.append(helper.make_node("DynamicQuantizeMatMul", [x, f"w{i}", f"s{i}"], [y], domain="com.microsoft"))
            else:
                nodes += int8_rows(x, f"w{i}", f"s{i}", y, f"/m{i}", w.shape[1])
        x = y
    if kind == "int8-row":
        inits += [numpy_helper.from_array(v, k) for k, v in INT8_ROW_CONSTS.items()]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 576])],
                              [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [None, 576])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model.SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal(s) * 0.05).astype(np.float32) for s in SHAPES]
    x = rng.standard_normal((args.rows, 576)).astype(np.float32)
    flops = 2 * args.rows * sum(n * k for n, k in SHAPES)
    kinds = ["fp32", "nbits-4-32-0", "nbits-4-32-4", "nbits-8-64-0", "nbits-8-64-4", "int8-tensor", "int8-row"]
    print(f"{cpu_name()}; {args.rows} rows, {args.threads} threads; 16 chained matmuls = {flops / 1e9:.1f} GFLOP")
    for kind in kinds:
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(build(kind, weights), options, providers=["CPUExecutionProvider"])
        session.run(None, {"x": x})
        start = time.perf_counter()
        for _ in range(5):
            session.run(None, {"x": x})
        seconds = (time.perf_counter() - start) / 5
        print(f"{kind:<14} {seconds * 1000:8.1f} ms  {flops / seconds / 1e12:5.2f} TOP/s")
    granted = amx_tiles_granted()  # MLAS asks for the tiles only when it installs its AMX u8 x s8 GEMM (at import)
    print(f"AMX: {'in the CPU' if 'amx_int8' in cpu_flags() else 'not in the CPU'}; ONNX Runtime's AMX int8 GEMM "
          + {True: "set up", False: "not set up", None: "unknown (cannot ask this kernel)"}[granted])


if __name__ == "__main__":
    main()
