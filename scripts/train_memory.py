"""Where a training step's memory goes: one step of the shipped recipe on its widest batch,
phase by phase (forward, loss, backward, optimiser), as the kernel counts it (peak resident
memory, VmHWM, reset before each phase) and as torch counts it (the tensors autograd keeps
from the forward for the backward: their total, and the largest kinds by shape). Then, with
``--steps N``, the run's first N steps as training takes them: resident memory after each
and the peak so far, which shows what the allocator keeps between steps of other shapes
(``--keep-free-memory``: without the trainer's hand-back of freed memory, ``HeapTrim``).

    python scripts/train_memory.py --steps 20 --validate --out results/training/memory.json
    python scripts/train_memory.py --steps 20 --validate --keep-free-memory --out results/training/memory_kept.json
    python scripts/train_memory.py --steps 20 --validate --growth 0 --out results/training/memory_every_step.json
    python scripts/train_memory.py --checkpointing --out results/training/memory_checkpointing.json

Timings are only comparable between runs on an otherwise quiet machine; the memory figures do
not depend on load.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time
from pathlib import Path

import torch

from hatllm_edge.core.data import load_dataset
from hatllm_edge.core.machine import (
    HeapTrim,
    cpu_name,
    peak_rss_mib,
    reset_peak_rss,
    rss_mib,
)
from hatllm_edge.core.prompt import PromptBuilder
from hatllm_edge.ranking.trie import TitleTrie
from hatllm_edge.training.batching import make_window_batch
from hatllm_edge.training.config import TrainConfig
from hatllm_edge.training.model import begin_token_id
from hatllm_edge.training.train import (
    batch_loss,
    optimise,
    plan_batches,
    training_units,
    unit_sizes,
)
from hatllm_edge.training.trainable import trainable_model
from hatllm_edge.training.validation import validate, validation_users


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-in", type=int, default=3)
    ap.add_argument("--n-cr", type=int, default=3)
    ap.add_argument("--examples", type=int, default=2400, help="windows the recipe samples (the plan's widest batch is used)")
    ap.add_argument("--checkpointing", action="store_true", help="recompute each decoder layer in the backward")
    ap.add_argument("--steps", type=int, default=0, help="then the run's first N steps, memory after each")
    ap.add_argument("--validate", action="store_true", help="then the run's validation (100 users), as training ends")
    ap.add_argument("--keep-free-memory", action="store_true", help="never hand freed memory back between steps (the trainer before)")
    ap.add_argument("--growth", type=float, default=HeapTrim().growth, help="hand back once resident memory grew by this share (0: after every step)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(out=Path("unused"), n_in=args.n_in, n_cr=args.n_cr, examples=args.examples, checkpointing=args.checkpointing)
    data = load_dataset(cfg.dataset)
    units = training_units(data, cfg)
    phases: dict[str, dict[str, float]] = {}
    reset_peak_rss()
    _, tokenizer, _, model = trainable_model(cfg)
    prompts = PromptBuilder(tokenizer.backend_tokenizer, tokenizer.eos_token_id, cfg.max_history, cfg.template,
                            begin_token_id(tokenizer))
    trie = TitleTrie.build(data.catalog, prompts)
    sizes = unit_sizes(cfg, units, data, prompts)
    steps = plan_batches(sizes, cfg.batch_size, cfg.epochs, cfg.seed)
    widest = max(steps, key=lambda s: len(s) * max(sizes[i] for i in s))
    batch = make_window_batch([units[i] for i in widest], data.catalog, prompts)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=cfg.lr)
    phases["load"] = {"peak_mib": peak_rss_mib(), "rss_mib": rss_mib()}

    saved: collections.Counter[tuple[str, tuple[int, ...]]] = collections.Counter()
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}  # resident anyway: not counted

    def pack(t: torch.Tensor) -> torch.Tensor:  # every tensor autograd keeps for the backward
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            saved[(str(t.dtype).removeprefix("torch."), tuple(t.shape))] += t.untyped_storage().nbytes()
        return t

    def phase(name: str, fn):  # noqa: ANN001, ANN202
        reset_peak_rss()
        t0 = time.time()
        out = fn()
        phases[name] = {"peak_mib": round(peak_rss_mib(), 1), "rss_mib": round(rss_mib(), 1), "s": round(time.time() - t0, 2)}
        return out

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = phase("forward+loss", lambda: batch_loss(model, batch, trie, cfg))
    phase("backward", loss.backward)
    phase("optimiser", optim.step)
    trace = []
    heap = HeapTrim(float("inf") if args.keep_free_memory else args.growth)
    reset_peak_rss()
    for n, step in enumerate(steps[: args.steps], start=1):
        t0 = time.time()
        batch = make_window_batch([units[i] for i in step], data.catalog, prompts)
        optimise(model, batch, trie, cfg, optim, params)
        trimmed = heap.step()
        trace.append({"step": n, "handed_back": trimmed, "tokens": batch.tokens, "width": int(batch.input_ids.shape[1]), "s": round(time.time() - t0, 2),
                      "rss_mib": round(rss_mib(), 1), "peak_mib": round(peak_rss_mib(), 1)})
        print(f"step {n:3d} width {trace[-1]['width']:4d} {trace[-1]['s']:6.2f} s  resident {trace[-1]['rss_mib']:8.0f} MiB  "
              f"peak {trace[-1]['peak_mib']:8.0f} MiB" + ("  handed back" if trimmed else ""), flush=True)
    if args.validate:
        users = validation_users(data, cfg.max_history, cfg.eval_users)
        phase("validation", lambda: validate(model, prompts, data, users, bf16=cfg.bf16, renormalise=True))
        print(f"validation     peak {phases['validation']['peak_mib']:8.0f} MiB   resident after {phases['validation']['rss_mib']:8.0f} MiB")
    kept = sorted(saved.items(), key=lambda kv: -kv[1])
    result = {
        "cpu": cpu_name(), "torch": torch.__version__, "checkpointing": args.checkpointing,
        "n_in": args.n_in, "n_cr": args.n_cr, "layers": model.schedule.num_layers,
        "batch": {"rows": int(batch.input_ids.shape[0]), "width": int(batch.input_ids.shape[1]), "tokens": batch.tokens,
                  "answer_tokens": int((batch.labels != -100).sum())},
        "phases": phases,
        "saved_for_backward_mib": round(sum(saved.values()) / 2**20, 1),
        "saved_by_kind_mib": [{"dtype": d, "shape": list(s), "mib": round(b / 2**20, 1)} for (d, s), b in kept[:12]],
        "hand_back_growth": None if args.keep_free_memory else args.growth,
        "allocator_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"},
        "steps": trace,
    }
    for name, p in list(phases.items())[:4]:
        print(f"{name:14s} peak {p['peak_mib']:8.0f} MiB   resident after {p['rss_mib']:8.0f} MiB")
    print(f"saved for backward: {result['saved_for_backward_mib']:.0f} MiB")
    for row in result["saved_by_kind_mib"]:
        print(f"  {row['mib']:8.1f} MiB  {row['dtype']:9s} {row['shape']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
