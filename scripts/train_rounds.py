"""Train one arm of the masks-vs-causal comparison through the rounds of the shipped recipe
(four, or more with ``--rounds``), for one set of seeds, resumably: re-run the same command
after an interruption and it continues the round in progress (``--resume``) or starts the next.

The rounds (docs/training.md): 2,400 sampled windows at peak lr 1e-3, validated every 100 steps
with the best step kept; then 1,920, 2,400 and 2,400 windows at 5e-4, each started from the
round before's kept checkpoint and validated at its end. Every round has its own seed, so each
samples other windows. The arm's model is the fourth round's folder.

    nice -n 10 python scripts/train_rounds.py hatllm --seeds 10,11,12,13 --out runs/ml100k/hatllm-seeds10
    nice -n 10 python scripts/train_rounds.py causal --seeds 10,11,12,13 --out runs/ml100k/causal-seeds10

More rounds: ``--rounds N`` goes on past the fourth with the fourth's settings (2,400 new
windows at 5e-4 each), and ``--start ROUND:CHECKPOINT`` takes the rounds before ROUND as done,
CHECKPOINT being their model, so a shipped model gets a fifth round without its first four:

    nice -n 10 python scripts/train_rounds.py hatllm --rounds 5 --start 5:models/hatllm-ml100k --seeds 4 \
        --out runs/ml100k/hatllm-shipped

Another base: ``--base gemma3-270m`` (or a folder / .gguf file) trains the same rounds on it.

Run it from outside the checkout with an absolute --out when the checkout may change
meanwhile (a training process imports lazily).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hatllm_edge.training.checkpoint import read_meta
from hatllm_edge.training.config import LAST_DIR, TrainConfig
from hatllm_edge.training.model import BaseModelSpec
from hatllm_edge.training.resume import STATE_FILE
from hatllm_edge.training.train import train

ARMS = {"hatllm": (3, 3), "causal": (0, 0)}
ROUNDS = (  # examples, peak lr, eval_every (0: at the end only)
    (2400, 1e-3, 100),
    (1920, 5e-4, 0),
    (2400, 5e-4, 0),
    (2400, 5e-4, 0),
)


def round_settings(n: int) -> tuple[int, float, int]:
    """Round ``n``'s windows, peak lr and validation cadence: rounds past the recipe's repeat its last."""
    return ROUNDS[min(n, len(ROUNDS)) - 1]


def parse_start(text: str) -> tuple[int, Path]:
    """``ROUND:CHECKPOINT`` -> (ROUND, CHECKPOINT), the checkpoint holding a model (hatllm.json)."""
    first, sep, folder = text.partition(":")
    if not sep or not first.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected ROUND:CHECKPOINT, e.g. 5:models/hatllm-ml100k")
    if int(first) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: ROUND must be 2 or more (round 1 starts from the base model)")
    if not (Path(folder) / "hatllm.json").is_file():
        raise argparse.ArgumentTypeError(f"{text!r}: {folder} is not a checkpoint folder (no hatllm.json)")
    return int(first), Path(folder).resolve()


def check_arm(arm: str, checkpoint: Path) -> None:
    """A round continues a model of its own arm: the LoRA shapes of both arms fit either."""
    schedule = read_meta(checkpoint).schedule
    if (schedule["n_in"], schedule["n_cr"]) != ARMS[arm]:
        raise SystemExit(f"--start: {checkpoint} has masks n_in={schedule['n_in']}, n_cr={schedule['n_cr']}, "
                         f"not the {arm} arm's {ARMS[arm]}; continue it as its own arm")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arm", choices=sorted(ARMS))
    ap.add_argument("--seeds", required=True, help="comma-separated seeds, one per round trained here")
    ap.add_argument("--out", type=Path, required=True, help="folder for the rounds (r1, r2, ...)")
    ap.add_argument("--rounds", type=int, default=len(ROUNDS), help=f"rounds in all (default {len(ROUNDS)}); later ones repeat the last")
    ap.add_argument("--start", type=parse_start, default=None, metavar="ROUND:CHECKPOINT",
                    help="the rounds before ROUND are done and CHECKPOINT is their model; train from ROUND on")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop (resumably) after this much time in all")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: the same rounds on a GPU")
    ap.add_argument("--base", default=None, help="base model as `train --base` takes it (gemma3-270m, a folder or "
                    ".gguf file); default the shipped SmolLM2-135M")
    ap.add_argument("--interactions", type=Path, default=None, help="train on this interactions file (with --items) "
                    "instead of ml-100k, e.g. ml-100k without each user's last item, whose test split is validation "
                    "in the real test's position (scripts/validation_position.py)")
    ap.add_argument("--items", type=Path, default=None)
    args = ap.parse_args()
    if (args.interactions is None) != (args.items is None):
        ap.error("give both --interactions and --items, or neither")
    data = {"interactions": args.interactions.resolve(), "items": args.items.resolve()} if args.interactions else {}
    first, previous = args.start if args.start else (1, None)
    if first > args.rounds:
        ap.error(f"--rounds {args.rounds}: " + (f"--start {first} is past the last round" if args.start else "at least 1"))
    if previous:
        check_arm(args.arm, previous)
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(seeds) != args.rounds - first + 1:
        ap.error(f"--seeds: give one seed per round trained here (rounds {first}-{args.rounds}: {args.rounds - first + 1}); "
                 f"got {len(seeds)}")
    torch.set_num_threads(args.threads)
    out = args.out.resolve()
    n_in, n_cr = ARMS[args.arm]
    base = BaseModelSpec.from_arg(args.base)
    deadline = time.time() + args.max_minutes * 60 if args.max_minutes else None
    trained = range(first, args.rounds + 1)
    for n, seed in zip(trained, seeds):
        examples, lr, eval_every = round_settings(n)
        folder = out / f"r{n}"
        if not (folder / LAST_DIR).is_dir():
            left = (deadline - time.time()) / 60 if deadline else None
            if left is not None and left <= 0:
                print(f"time is up before round {n}; run the same command again to continue")
                return
            cfg = TrainConfig(out=folder, n_in=n_in, n_cr=n_cr, base=base, examples=examples, batch_size=8, lr=lr, loss="msl", seed=seed,
                              init_from=str(previous) if previous else None, eval_every=eval_every, eval_users=100,
                              save_every=10, max_minutes=left, device=args.device, **data)
            print(f"round {n}: {args.arm}, seed {seed}, {examples} windows, lr {lr}" + (f", from {previous}" if previous else ""), flush=True)
            summary = train(cfg, resume=(folder / STATE_FILE).is_file())
            if not summary["finished"]:
                print(f"round {n} stopped at step {summary['steps_done']} of {summary['steps_planned']}; run the same command again to continue")
                return
        previous = folder  # the round's kept (best validated) checkpoint starts the next
    rounds = {n: json.loads((out / f"r{n}" / "hatllm.json").read_text(encoding="utf-8")) for n in trained}
    record = {"arm": args.arm, "base": base.to_dict(), "seeds": seeds, "model": str(out / f"r{args.rounds}"),
              **({"data": {k: str(v) for k, v in data.items()}} if data else {}),
              **({"start": {"round": first, "from": str(args.start[1])}} if args.start else {}),
              "rounds": [{"round": n, "seed": r["train"]["seed"], "examples": r["train"]["examples"], "lr": r["train"]["lr"],
                          "steps": r["train_summary"]["best"]["step"], "train_s": r["train_summary"]["train_s"]}
                         for n, r in rounds.items()]}
    (out / "rounds.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
