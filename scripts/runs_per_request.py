"""ONNX Runtime runs per request as `rank` makes them (the model's decoding: renormalised, SASRec
fused): the LLM's runs and the assistant's, for candidate and full-catalog requests of B users,
on each compute route. Runs are counted, not timed, so a busy machine reads the same.

    python scripts/runs_per_request.py BUNDLE --out results/engine/runs_per_request.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hatllm_edge.bench.workloads import Workload, make_requests  # noqa: E402
from hatllm_edge.core.data import load_dataset  # noqa: E402
from hatllm_edge.engine.backend import pass_tokens  # noqa: E402
from hatllm_edge.ranking.ranker import Ranker  # noqa: E402


class _Counted:
    """The assistant's ONNX Runtime session, counting its runs."""

    def __init__(self, session: object) -> None:
        self.session, self.runs = session, 0

    def run(self, *args: object, **kwargs: object) -> object:
        self.runs += 1
        return self.session.run(*args, **kwargs)  # type: ignore[attr-defined]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--workloads", default="cand100-h20-b1,cand100-h20-b8,cand100-h20-b32,top10-h10-b1,top10-h10-b8")
    ap.add_argument("--computes", default="native,int8,native@cuda",
                    help="CPU routes; native@cuda: the native route with the CUDA engine's pass size, which sets its run count")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    data = load_dataset("ml-100k", None, None)
    rows = []
    for route in args.computes.split(","):
        compute, _, layout = route.partition("@")
        ranker = Ranker.from_bundle(args.bundle, "cpu", args.threads, compute)  # type: ignore[arg-type]
        if layout == "cuda":
            ranker.backend.pass_tokens = pass_tokens("cuda", ranker.backend.vocab_size)  # type: ignore[attr-defined]
        assert ranker.assistant is not None
        counted = _Counted(ranker.assistant.session)
        ranker.assistant.session = counted
        for name in args.workloads.split(","):
            w = Workload.parse(name)
            histories, cands = make_requests(data, w, 0, 1)[0]
            llm, assistant = ranker.backend.runs, counted.runs
            if w.kind == "candidates":
                ranker.score_batch(histories, cands)
            else:
                ranker.top_k(histories, k=w.k)
            row = {"route": route, "pass_tokens": ranker.backend.pass_tokens, "workload": name,  # type: ignore[attr-defined]
                   "llm_runs": ranker.backend.runs - llm, "assistant_runs": counted.runs - assistant}
            row["total_runs"] = row["llm_runs"] + row["assistant_runs"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"bundle": str(args.bundle), "command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
