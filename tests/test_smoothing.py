"""SmoothQuant on the int8 route: activation statistics measured at export, folded by the
engine's int8 rewrite into the norms and producer weights (no extra op), and worth it where
an input channel runs far larger than the rest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_llama_config
from onnx import numpy_helper
from transformers import LlamaForCausalLM

from hatllm_edge.core.data import Catalog
from hatllm_edge.core.masks import LayerSchedule
from hatllm_edge.core.prompt import PromptBuilder
from hatllm_edge.engine.int8 import CALIBRATION_PREFIX, int8_compute, smoothing
from hatllm_edge.engine.quant import node_weight
from hatllm_edge.engine.session import OnnxBackend
from hatllm_edge.export import export_onnx
from hatllm_edge.export.calibrate import activation_absmax, calibration_sequences
from hatllm_edge.export.validate import run_steps, sample_steps
from hatllm_edge.training.model import HatLLM

CATALOG = Catalog(tuple(f"i{n}" for n in range(6)), ("Heat (1995)", "Fargo (1996)", "Babe (1995)", "Alien (1979)",
                                                    "Seven (1995)", "Jaws (1975)"))
LAYERS = 3


@pytest.fixture(scope="module")
def model() -> HatLLM:
    """A tiny Llama whose norms carry an outlier channel, undone in the weights that read it:
    the same function in float, but the int8 quantiser's step is set by that one channel."""
    torch.manual_seed(0)
    lm = LlamaForCausalLM(tiny_llama_config(layers=LAYERS, hidden=64, init=0.1)).eval()
    with torch.no_grad():
        for layer in lm.model.layers:
            for norm, readers in ((layer.input_layernorm, ("q_proj", "k_proj", "v_proj")),
                                  (layer.post_attention_layernorm, ("gate_proj", "up_proj"))):
                norm.weight[5] *= 40.0
                for name in readers:
                    module = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
                    module.weight[:, 5] /= 40.0
    return HatLLM(lm, LayerSchedule(LAYERS, 1, 1))


@pytest.fixture(scope="module")
def exported(model: HatLLM, prompts: PromptBuilder, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("smoothing")
    stats = activation_absmax(model, calibration_sequences(prompts, CATALOG, count=6), batch=4)
    return (export_onnx(model, root / "plain.onnx", quant="int4"),
            export_onnx(model, root / "calibrated.onnx", quant="int4", calibration=stats))


def test_statistics_cover_every_linear_and_skip_padding(model: HatLLM, prompts: PromptBuilder) -> None:
    rows = list(calibration_sequences(prompts, CATALOG, count=5))
    batched = activation_absmax(model, rows, batch=5)
    alone = activation_absmax(model, rows, batch=1)
    assert len(batched) == 7 * LAYERS + 1 and "lm_head" in batched
    for name, value in alone.items():  # left padding of the batch is not counted
        np.testing.assert_allclose(batched[name], value, rtol=1e-4)
    assert batched["model.layers.0.self_attn.q_proj"].argmax() == 5  # the outlier channel is seen


def test_the_rewrite_folds_every_input_without_an_extra_op(exported: tuple[Path, Path]) -> None:
    proto = onnx.load(str(exported[1]))
    arrays = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert sum(name.startswith(CALIBRATION_PREFIX) for name in arrays) == 7 * LAYERS + 1
    weights = {n.name: w for n in proto.graph.node if (w := node_weight(n, arrays)) is not None}
    plan = smoothing(proto, arrays, weights)
    assert len(plan.columns) == len(weights) == 7 * LAYERS + 1  # q/k/v/o, gate/up/down, head
    assert len(plan.norms) == 2 * LAYERS + 1  # input and post-attention norms, the final norm (for the head)
    assert sorted(plan.rows) == sorted(n for n in weights if "v_proj" in n or "up_proj" in n)
    rewritten, _ = int8_compute(proto)
    plain, _ = int8_compute(onnx.load(str(exported[0])))
    assert len(rewritten.graph.node) == len(plain.graph.node)  # folded, not inserted
    assert not any(t.name.startswith(CALIBRATION_PREFIX) for t in rewritten.graph.initializer)


def test_smoothing_cuts_the_int8_error_of_an_outlier_channel(exported: tuple[Path, Path]) -> None:
    steps = sample_steps(49152, batch=3, prefill=12, step=2)
    errors = {}
    for label, path in zip(("plain", "smoothed"), exported):
        native = run_steps(OnnxBackend(path, threads=1, compute="native"), steps)
        int8 = run_steps(OnnxBackend(path, threads=1, compute="int8"), steps)
        errors[label] = max(float(np.abs(a - b).max()) for a, b in zip(native, int8))
    assert errors["smoothed"] < 0.5 * errors["plain"], errors
