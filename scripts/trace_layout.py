"""Where does a candidate's score start to depend on its packing layout? (docs/results.md, "A user's
result does not depend on its batch or on candidate order".)

Scores seeded random candidates for one seeded history twice, with rows of ``--pack-a`` and
``--pack-b`` fed tokens, on a bundle under ``--compute``. Prints how far the scores moved, then
replays both candidate passes with every node output of ``--layers`` exposed and lists, in
graph order, the nodes whose output differs at the tokens of the candidate that moved most.

    python scripts/trace_layout.py BUNDLE --compute int8 --layers 0,8
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from hatllm_edge.core.formats import (
    INPUT_IDS,
    KEY_POSITIONS,
    LOGITS_TO_KEEP,
    MODEL_FILE,
    PAST_ROWS,
    POSITION_IDS,
    TARGET_IDS,
)
from hatllm_edge.engine.backend import cache_rows, key_positions
from hatllm_edge.engine.int8 import block_compute, int8_compute
from hatllm_edge.ranking.candidates import score_candidates
from hatllm_edge.ranking.ranker import Ranker


def _record(ranker: Ranker, history: list[int], candidates: list[int], pack: int) -> tuple[np.ndarray, dict]:
    """Scores in item order, and the feeds of the (single) candidate pass."""
    seen: dict = {}
    backend = ranker.backend
    inner = backend.token_logprobs

    def spy(ids, positions, masks, cache, targets, rows=None):  # type: ignore[no-untyped-def]
        past_rows = cache_rows(rows, ids.shape[0], cache.batch)
        seen.update(ids=ids, positions=positions, masks=masks, targets=targets, past_rows=past_rows,
                    keys=key_positions(cache.positions, past_rows, positions), cache=[v.numpy() for v in cache.values])
        return inner(ids, positions, masks, cache, targets, rows)

    backend.token_logprobs = spy  # type: ignore[method-assign]
    try:
        ranked = score_candidates(backend, ranker.prompts, [ranker.titles(history)],
                                  [ranker.titles(candidates)], pack_tokens=pack)[0]
    finally:
        del backend.token_logprobs
    return ranked.by_position(), seen


def _locate(ids: np.ndarray, tokens: np.ndarray) -> tuple[int, int]:
    """(row, column) where ``tokens`` sit in a pass's input_ids."""
    n = len(tokens)
    for r in range(ids.shape[0]):
        for col in range(ids.shape[1] - n + 1):
            if np.array_equal(ids[r, col:col + n], tokens):
                return r, col
    raise SystemExit("a candidate was not found in its pass")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--compute", default="int8")
    parser.add_argument("--layers", default="0,8", help="comma-separated layer indices to trace")
    parser.add_argument("--pack-a", type=int, default=16, help="row size of layout A (16: one candidate per row)")
    parser.add_argument("--pack-b", type=int, default=32)
    parser.add_argument("--history", type=int, default=20)
    parser.add_argument("--candidates", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    ranker = Ranker.from_bundle(args.bundle, threads=2, compute=args.compute)
    ranker.prompts = ranker.prompts.with_max_history(0)
    rng = random.Random(args.seed)
    history = rng.sample(range(len(ranker.catalog)), args.history)
    candidates = rng.sample(range(len(ranker.catalog)), args.candidates)
    scores_a, a = _record(ranker, history, candidates, args.pack_a)
    scores_b, b = _record(ranker, history, candidates, args.pack_b)
    moved = np.abs(scores_a - scores_b)
    print(f"score |A - B| over {len(candidates)} candidates: max {moved.max():.3g}, mean {moved.mean():.3g} nats")

    # the candidate whose score moved most, found by its fed tokens in both layouts
    prompt = ranker.prompts.prompt(ranker.titles(history))
    segment = ranker.prompts.answer_segment(prompt)
    fed = [ranker.prompts.answer(t, segment).ids[:-1] for t in ranker.titles(candidates)]
    c = int(np.argmax(moved))
    n = len(fed[c])
    (ra, ca), (rb, cb) = (_locate(f["ids"], fed[c]) for f in (a, b))
    model = onnx.load(str(args.bundle / MODEL_FILE))
    if args.compute == "int8-block":
        model = block_compute(model)[0]
    elif args.compute.startswith("int8"):
        model = int8_compute(model, "tensor" if args.compute == "int8-tensor" else "row")[0]
    layers = [f"/model/layers.{i}/" for i in args.layers.split(",")]
    names = [o for node in model.graph.node if any(node.name.startswith(p) for p in layers) for o in node.output]
    present = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(o) for o in names if o not in present)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    graph_inputs = [i.name for i in session.get_inputs()]
    past = [name for name in graph_inputs if name.startswith("past_key_values.")]

    def replay(feeds: dict) -> dict[str, np.ndarray]:
        inputs = {INPUT_IDS: feeds["ids"], POSITION_IDS: feeds["positions"], TARGET_IDS: targets if (targets := np.asarray(feeds["targets"], np.int64)).ndim == 3 else targets[..., None],
                  PAST_ROWS: feeds["past_rows"], LOGITS_TO_KEEP: np.array(0, np.int64)}
        if KEY_POSITIONS in graph_inputs:  # a sliding-window graph (Gemma 3)
            inputs[KEY_POSITIONS] = feeds["keys"]
        inputs.update({f"mask_{k}": v for k, v in feeds["masks"].items() if f"mask_{k}" in graph_inputs})
        inputs.update(zip(past, feeds["cache"]))
        return dict(zip(names, session.run(names, inputs)))

    out_a, out_b = replay(a), replay(b)
    print(f"candidate {c} ({n} fed tokens, score moved {moved[c]:.3g}): row {ra} column {ca} in A, "
          f"row {rb} column {cb} in B")
    print(f"{'max |A - B|':>12} {'max |A|':>10}  node output")
    for name in names:
        x, y = out_a[name], out_b[name]
        if x.ndim < 2 or x.shape[:2] != a["ids"].shape or y.shape[:2] != b["ids"].shape:
            continue
        xa, yb = x[ra, ca:ca + n].astype(np.float64), y[rb, cb:cb + n].astype(np.float64)
        diff = float(np.abs(xa - yb).max())
        if diff > 0:
            print(f"{diff:12.3g} {float(np.abs(xa).max()):10.4g}  {name}")


if __name__ == "__main__":
    main()
