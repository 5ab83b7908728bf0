"""Training throughput on this machine: the shipped recipe's first steps under each lever.

Each variant is a real ``hatllm-edge train`` run (same seed, so the same batches) cut after
``--steps`` steps, into a temporary folder. Reported per variant: trained tokens/s and
targets/s over the steps after the first (the first carries warm-up and compilation, reported
apart), peak RSS, and the share of padded positions in the batches (what packing windows into
rows could save at most). Variants run one after another in one process, so their ratios are
comparable; absolute figures belong to this CPU (printed with them).

    python scripts/train_throughput.py --steps 6 --out results/training/throughput.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hatllm_edge.core.machine import cpu_name
from hatllm_edge.training.config import LOG_FILE, TrainConfig
from hatllm_edge.training.train import train

VARIANTS = {
    "bf16": dict(bf16=True, threads=2),  # the shipped recipe: bf16 autocast on both cores
    "fp32": dict(bf16=False, threads=2),
    "bf16-1thread": dict(bf16=True, threads=1),
    "bf16-compile": dict(bf16=True, threads=2, compile=True),
    "bf16-no-lora-dropout": dict(bf16=True, threads=2, lora_dropout=0.0),  # what drawing LoRA's dropout masks costs
}


def measure(name: str, steps: int, n_in: int, n_cr: int, threads: int, **fields: bool | float) -> dict:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        # the shipped recipe (docs/training.md) with the cross-entropy loss the table there was
        # measured with; examples sized so that the run is `steps` long
        cfg = TrainConfig(out=Path(tmp), n_in=n_in, n_cr=n_cr, examples=8 * steps, batch_size=8, lr=1e-3, loss="ce",
                          eval_every=0, eval_users=1, save_every=0, **fields)  # one validation user: the run validates once at its end
        t0 = time.time()
        train(cfg, progress=False)
        wall = time.time() - t0
        log = [json.loads(line) for line in (Path(tmp) / LOG_FILE).read_text().splitlines()]
    rest = log[1:]
    tokens, targets, seconds = (sum(r[k] for r in rest) for k in ("tokens", "targets", "step_s"))
    return {"variant": name, "threads": threads, **fields, "steps": len(log), "first_step_s": log[0]["step_s"],
            "tokens_per_s": round(tokens / seconds, 1), "targets_per_s": round(targets / seconds, 2),
            "median_step_s": round(statistics.median(r["step_s"] for r in rest), 2),
            "padding_share": round(1 - sum(r["tokens"] for r in log) / sum(r["slots"] for r in log), 3),
            "wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="training steps per variant (the first is reported apart)")
    ap.add_argument("--n-in", type=int, default=3)
    ap.add_argument("--n-cr", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the first step is reported apart)")
    rows = []
    for name in (v.strip() for v in args.variants.split(",")):
        if name not in VARIANTS:
            ap.error(f"unknown variant {name!r}; choose from: {', '.join(VARIANTS)}")
        rows.append(measure(name, args.steps, args.n_in, args.n_cr, **VARIANTS[name]))
        r = rows[-1]
        print(f"{name:14s} {r['tokens_per_s']:8.1f} tok/s {r['targets_per_s']:6.2f} targets/s "
              f"step {r['median_step_s']:6.2f} s (first {r['first_step_s']:.1f} s) padding {r['padding_share']:.1%}", flush=True)
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["speed_vs_first"] = round(r["tokens_per_s"] / base, 3)
    result = {"cpu": cpu_name(), "torch": torch.__version__, "n_in": args.n_in, "n_cr": args.n_cr,
              "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "variants": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
