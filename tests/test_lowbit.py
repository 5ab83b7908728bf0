"""The engine's load-time int8 rewrite against a NumPy reference, on a one-matmul graph."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from hatllm_edge.engine.int8 import int8_compute, int8_per_channel


def _matmul_graph(weight: np.ndarray) -> onnx.ModelProto:
    """y = x @ W^T as a float MatMul with a constant [K, N] right side."""
    n, k = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="/m/MatMul")], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", "s", k])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", "s", n])],
        [numpy_helper.from_array(np.ascontiguousarray(weight.T), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_int8_rows_equal_per_token_symmetric_quantisation() -> None:
    """Each token is rounded to 127 steps of its own absmax (half to even), the weights to 127
    steps of each output channel's absmax; the integer product is then scaled back. An
    outlier token must not coarsen its neighbours' steps."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((48, 96)).astype(np.float32)
    x = rng.standard_normal((2, 5, 96)).astype(np.float32)
    x[0, 1] *= 300.0  # an outlier token
    x[1, 2] = 0.0  # an all-zero token: its scale falls back to eps, its output is 0
    rewritten, changed = int8_compute(_matmul_graph(weight))
    assert changed == 1
    got = _run(rewritten, x)

    codes, w_scale = int8_per_channel(weight)  # [K, N] int8, [N]
    a_scale = np.maximum(np.abs(x).max(-1, keepdims=True), np.float32(1e-8)) * np.float32(1 / 127)
    a_codes = np.rint(x / a_scale)  # numpy rounds half to even, as QuantizeLinear does
    assert np.abs(a_codes).max() <= 127
    expected = (a_codes @ codes.astype(np.float32)) * a_scale * w_scale
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert np.all(got[1, 2] == 0)
    # the ordinary tokens keep int8 precision next to the outlier
    float_out = x @ weight.T
    ordinary = [(0, 0), (0, 2), (1, 0)]
    for b, s in ordinary:
        assert np.abs(got[b, s] - float_out[b, s]).max() <= 0.02 * np.abs(float_out[b, s]).max()
