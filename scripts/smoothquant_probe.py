"""How much would SmoothQuant factors cut the int8 route's score error?

SmoothQuant (Xiao et al., 2023) divides each matmul input channel j by
s_j = max|X_j|^a / max|W_j|^(1-a) and multiplies the weight's column j by it: exact in float,
but the per-token int8 quantiser then sees flatter activations. Here the factors are
calibrated on ``--calibration`` seeded validation prompts (every position), applied as a Mul in
front of each int8 matmul (not folded into the norms: this measures accuracy, not speed), and
the candidate scores of seeded test users are compared with the bundle's native 4-bit route:
mean and max |score difference| in nats, and Kendall's tau against native, for the plain int8
route and for each ``--alpha``.

    python scripts/smoothquant_probe.py BUNDLE --alpha 0.5 --alpha 0.8
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from hatllm_edge.core.data import load_dataset
from hatllm_edge.core.formats import (
    INPUT_IDS,
    KEY_POSITIONS,
    LOGITS_TO_KEEP,
    MASK_INPUT,
    MODEL_FILE,
    PAST_ROWS,
    POSITION_IDS,
    TARGET_IDS,
)
from hatllm_edge.core.masks import build_masks, causal_visibility
from hatllm_edge.engine import int8, quant
from hatllm_edge.engine.session import OnnxBackend
from hatllm_edge.evaluation.fidelity import kendall_tau
from hatllm_edge.ranking.ranker import Ranker


def channel_absmax(model: onnx.ModelProto, ranker: Ranker, inputs: list[str], prompts: int, seed: int) -> dict[str, np.ndarray]:
    """max |x_j| over every position of ``prompts`` validation prompts, per matmul input."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in inputs:
        probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    out: dict[str, np.ndarray] = {}
    for ex in random.Random(seed).sample(load_dataset().split("valid", ranker.prompts.max_history), prompts):
        p = ranker.prompts.prompt(ranker.titles([ranker.catalog.index(i) for i in ex.history]))
        ids, segs = np.asarray(p.ids)[None], np.asarray(p.segments)[None]
        masks = build_masks(segs, segs, causal_visibility(np.ones_like(ids, bool), ids.shape[1]))
        positions = np.arange(ids.shape[1])[None]
        feeds = {INPUT_IDS: ids, POSITION_IDS: positions, LOGITS_TO_KEEP: np.array(0), PAST_ROWS: np.zeros(1, np.int64),
                 TARGET_IDS: np.zeros((*ids.shape, 1), np.int64),
                 **{MASK_INPUT.format(k): masks[k] for k in ranker.backend.mask_kinds}}  # type: ignore[attr-defined]
        if any(i.name == KEY_POSITIONS for i in session.get_inputs()):  # a sliding-window graph (Gemma 3)
            feeds[KEY_POSITIONS] = positions
        for i in session.get_inputs():
            if i.name.startswith("past_key_values."):
                feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
        for name, value in zip(inputs, session.run(inputs, feeds)):
            m = np.abs(value.reshape(-1, value.shape[-1])).max(0)
            out[name] = np.maximum(out[name], m) if name in out else m
    return out


def smoothed_int8(model: onnx.ModelProto, absmax: dict[str, np.ndarray], alpha: float) -> onnx.ModelProto:
    """The int8 route's graph with each matmul input divided by its factors (one set per input,
    shared by the matmuls that read it) and the weights' columns multiplied by them."""
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weights = {n.name: w for n in model.graph.node if (w := quant.node_weight(n, arrays)) is not None}
    readers: dict[str, list[np.ndarray]] = {}
    for n in model.graph.node:
        if n.name in weights:
            readers.setdefault(n.input[0], []).append(np.abs(weights[n.name]).max(0))
    factor = {}
    for name, cols in readers.items():
        f = np.maximum(absmax[name], 1e-5) ** alpha / np.maximum(np.max(cols, axis=0), 1e-5) ** (1 - alpha)
        factor[name] = (f / np.exp(np.log(f).mean())).astype(np.float32)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    divided: set[str] = set()
    for node in model.graph.node:
        w = weights.get(node.name)
        if w is None:
            nodes.append(node)
            continue
        a, base = node.input[0], quant.param_name(node.input[1])
        codes, scale = int8.int8_per_channel(w * factor[a][None, :])
        inits += [numpy_helper.from_array(codes, f"{base}.int8"), numpy_helper.from_array(scale, f"{base}.int8_scale")]
        if a not in divided:
            divided.add(a)
            inits.append(numpy_helper.from_array((1.0 / factor[a]).astype(np.float32), f"{a}/inv_smooth"))
            nodes.append(helper.make_node("Mul", [a, f"{a}/inv_smooth"], [f"{a}/smoothed"], name=f"{a}/Smooth"))
        nodes += int8.int8_rows(f"{a}/smoothed", f"{base}.int8", f"{base}.int8_scale", node.output[0], node.name, w.shape[1])
    inits += [numpy_helper.from_array(v, k) for k, v in int8.INT8_ROW_CONSTS.items()]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    used = {x for n in nodes for x in n.input}
    del out.graph.initializer[:]
    out.graph.initializer.extend([t for t in model.graph.initializer if t.name in used] + inits)
    out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--alpha", type=float, action="append", default=[])
    parser.add_argument("--calibration", type=int, default=32, help="validation prompts for the channel maxima")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    native = Ranker.from_bundle(args.bundle, threads=2, compute="native")
    rng = random.Random(args.seed)
    requests = [([native.catalog.index(i) for i in ex.history], rng.sample(range(len(native.catalog)), args.candidates))
                for ex in rng.sample(load_dataset().split("test", native.prompts.max_history), args.users)]

    def scores(ranker: Ranker) -> list[np.ndarray]:
        return [ranker.score(h, c).by_position() for h, c in requests]

    reference = scores(native)
    routes: list[tuple[str, Ranker]] = [("int8 (per token)", Ranker.from_bundle(args.bundle, threads=2, compute="int8"))]
    model = onnx.load(str(args.bundle / MODEL_FILE))
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    inputs = sorted({n.input[0] for n in model.graph.node if quant.node_weight(n, arrays) is not None})
    absmax = channel_absmax(model, native, inputs, args.calibration, args.seed + 1) if args.alpha else {}
    for alpha in args.alpha:
        graph = smoothed_int8(model, absmax, alpha).SerializeToString()
        path = Path(tempfile.gettempdir()) / f"smoothquant-{alpha}.onnx"
        path.write_bytes(graph)
        backend = OnnxBackend(path, threads=2, compute="native")
        routes.append((f"int8 + SmoothQuant a={alpha}", Ranker(backend, native.prompts, native.catalog, native.meta)))
    print(f"{'route':<28} {'mean |d|':>9} {'max |d|':>8} {'tau vs native':>14}")
    for label, ranker in routes:
        got = scores(ranker)
        d = np.concatenate([np.abs(a - b) for a, b in zip(got, reference)])
        tau = float(np.mean([kendall_tau(a, b) for a, b in zip(got, reference)]))
        print(f"{label:<28} {d.mean():>9.3f} {d.max():>8.3f} {tau:>14.3f}")


if __name__ == "__main__":
    main()
