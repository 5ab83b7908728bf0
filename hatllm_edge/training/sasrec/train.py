"""Training SASRec on loo-full: windows that cover every training target once per epoch, early stopping on validation NDCG@10, resumable."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from hatllm_edge.core.data import Dataset, load_dataset
from hatllm_edge.core.errors import InputError
from hatllm_edge.core.formats import ASSISTANT_CONFIG as CONFIG_FILE
from hatllm_edge.core.machine import cpu_name
from hatllm_edge.core.recipe import LR_SCHEDULES, LRSchedule
from hatllm_edge.ranking.assistant import PAD, catalog_ids, read_config
from hatllm_edge.training.resume import load_state, restore, save_state
from hatllm_edge.training.sasrec.checkpoint import LOG_FILE, save_checkpoint
from hatllm_edge.training.sasrec.evaluate import evaluate_scorer, torch_scorer
from hatllm_edge.training.sasrec.model import SASRec, SASRecConfig


def training_windows(
    sequences: Sequence[Sequence[int]], max_len: int, stride: int | None = None, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Windows over training sequences (model ids) that train every next-item target once.

    For a sequence ``t``, input position ``j`` predicts ``t[j + 1]``. A window ending at input
    position ``e`` (exclusive) reads ``t[max(0, e - max_len):e]`` and carries the loss of its
    last ``stride`` positions (all of them for the earliest window), so every target sees
    ``max_len - stride + 1``..``max_len`` items before it (or all there are). Window ends step back by
    ``stride`` from the sequence's end; with ``rng`` the first step is a random 1..stride, so
    the window boundaries move from epoch to epoch. Returns (inputs, targets), both
    [windows, max_len] int64 left-padded; target 0 = no loss at that position.
    """
    stride = max_len if stride is None else stride
    if not 1 <= stride <= max_len:
        raise InputError(f"stride {stride} not in 1..max_len ({max_len})")
    ins: list[np.ndarray] = []
    tgts: list[np.ndarray] = []
    for t in sequences:
        t = np.asarray(t, dtype=np.int64)
        m = len(t) - 1  # number of targets
        if m < 1:
            continue
        first = int(rng.integers(1, stride + 1)) if rng is not None else stride
        e, step = m, first
        while e > 0:
            s = max(0, e - max_len)
            lo = max(0, e - step)
            row_in = np.zeros(max_len, dtype=np.int64)
            row_t = np.zeros(max_len, dtype=np.int64)
            row_in[max_len - (e - s) :] = t[s:e]
            row_t[max_len - (e - lo) :] = t[lo + 1 : e + 1]
            ins.append(row_in)
            tgts.append(row_t)
            e, step = lo, stride
    if not ins:
        return np.zeros((0, max_len), dtype=np.int64), np.zeros((0, max_len), dtype=np.int64)
    return np.stack(ins), np.stack(tgts)


def train_sequences(data: Dataset) -> list[list[int]]:
    """Each user's training part (``seq[:-2]``) as model ids, in the data set's user order."""
    return [catalog_ids(data.catalog, seq[:-2]) for seq in data.sequences.values()]




@dataclass(frozen=True)
class TrainConfig:
    out: Path
    dataset: str = "ml-100k"
    interactions: Path | None = None
    items: Path | None = None
    max_len: int = 50
    hidden: int = 64
    heads: int = 1
    blocks: int = 2
    dropout: float = 0.2
    stride: int = 50  # loss positions per window (<= max_len); smaller = more context per target, more compute
    batch_size: int = 128  # windows per step
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: LRSchedule = "constant"  # after a linear warm-up: "constant" or "cosine" (to max_epochs)
    warmup_steps: int = 100
    max_epochs: int = 200
    patience: int = 20  # stop after this many evaluations without a better validation NDCG@10
    eval_every: int = 1  # epochs
    max_minutes: float | None = None  # wall-clock budget of the training loop
    eval_batch: int = 256
    threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        at_least_one = ("max_len", "hidden", "heads", "blocks", "stride", "batch_size", "max_epochs", "patience", "eval_every", "eval_batch")
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise InputError(f"SASRec training: {name} is {getattr(self, name)}; it must be at least 1")
        if self.stride > self.max_len:
            raise InputError(f"SASRec training: stride {self.stride} is over max_len {self.max_len}")
        if self.hidden % self.heads:
            raise InputError(f"SASRec training: hidden {self.hidden} is not a multiple of heads {self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"SASRec training: dropout {self.dropout} not in [0, 1)")
        if not self.lr > 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise InputError(f"SASRec training: need lr > 0, weight_decay >= 0 and warmup_steps >= 0 (got {self.lr}, {self.weight_decay}, {self.warmup_steps})")
        if self.schedule not in LR_SCHEDULES:
            raise InputError(f"SASRec training: schedule {self.schedule!r}: expected 'constant' or 'cosine'")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise InputError(f"SASRec training: max_minutes {self.max_minutes} must be above 0")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"SASRec training: threads {self.threads} must be at least 1")

    def model_config(self, num_items: int) -> SASRecConfig:
        return SASRecConfig(num_items, self.max_len, self.hidden, self.heads, self.blocks, self.dropout)

    def to_json(self) -> dict[str, Any]:
        return {f.name: (str(v) if isinstance(v := getattr(self, f.name), Path) else v) for f in fields(self)}


# what a resumed run may change: when to stop, and threads (the LR schedule keeps its saved state)
_RESUMABLE = frozenset({"out", "max_epochs", "patience", "max_minutes", "threads", "eval_batch"})
_PATHS = ("interactions", "items")  # compared by the file they name


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    from torch.optim.lr_scheduler import (
        ConstantLR,
        CosineAnnealingLR,
        LinearLR,
        SequentialLR,
    )

    warm = max(1, min(cfg.warmup_steps, total_steps))
    warmup = LinearLR(opt, start_factor=1.0 / warm, end_factor=1.0, total_iters=warm)
    if cfg.schedule == "constant":
        rest: torch.optim.lr_scheduler.LRScheduler = ConstantLR(opt, factor=1.0, total_iters=0)
    elif cfg.schedule == "cosine":
        rest = CosineAnnealingLR(opt, T_max=max(1, total_steps - warm), eta_min=cfg.lr * 0.01)
    else:
        raise InputError(f"schedule {cfg.schedule!r}: expected 'constant' or 'cosine'")
    return SequentialLR(opt, [warmup, rest], milestones=[warm])


def window_loss(model: SASRec, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the whole catalog at the positions with a target; (loss, count)."""
    hidden = model.encode(inputs)
    sel = targets != PAD
    logits = model.item_logits(hidden[sel])
    return F.cross_entropy(logits, targets[sel] - 1), int(sel.sum())


def train(
    cfg: TrainConfig, resume: bool = False, progress: bool = True, data: Dataset | None = None, command: str | None = None,
) -> dict[str, Any]:
    """Train SASRec, keep the best weights by validation NDCG@10 in ``cfg.out`` and return the
    summary (also written into ``sasrec.json``, with ``wall_s`` of this call and, when given, the
    ``command`` that ran it). ``resume`` continues from ``train_state.pt``."""
    t_call = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = data if data is not None else load_dataset(cfg.dataset, cfg.interactions, cfg.items)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = SASRec(cfg.model_config(len(data.catalog)))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    seqs = train_sequences(data)
    # epochs differ by a window or so per user (random boundaries); the schedule counts epoch 0's
    steps_per_epoch = math.ceil(len(training_windows(seqs, cfg.max_len, cfg.stride, np.random.default_rng([cfg.seed, 0]))[0]) / cfg.batch_size)
    sched = _scheduler(opt, cfg, steps_per_epoch * cfg.max_epochs)
    st: dict[str, Any] = {"epoch": 0, "step": 0, "best": None, "best_epoch": None, "bad_evals": 0, "train_s": 0.0,
                          "eval_s": 0.0, "targets": 0, "windows": 0, "stopped": None}
    log_path = out / LOG_FILE
    if resume:
        saved = load_state(out, cfg.to_json(), _RESUMABLE, paths=_PATHS)
        model.load_state_dict(restore(saved, opt, sched))
        st = saved["progress"]
        st["stopped"] = None  # a larger budget may continue a run that stopped; patience still counts
    else:
        log_path.write_text("", encoding="utf-8")
    n_params = sum(p.numel() for p in model.parameters())
    threads = torch.get_num_threads()
    meta_extra = lambda: {"dataset": data.name, "train_config": cfg.to_json(), "training": _summary(st, n_params, threads, steps_per_epoch)}  # noqa: E731
    total = steps_per_epoch * cfg.max_epochs
    bar = tqdm(total=total, initial=st["step"], desc="sasrec", unit="step", disable=not progress, mininterval=2.0)
    started = time.perf_counter() - st["train_s"] - st["eval_s"]
    while st["epoch"] < cfg.max_epochs and st["stopped"] is None:
        epoch = st["epoch"]
        rng = np.random.default_rng([cfg.seed, epoch])
        ins, tgts = training_windows(seqs, cfg.max_len, cfg.stride, rng)
        order = rng.permutation(len(ins))
        model.train()
        t0 = time.perf_counter()
        loss_sum, count = 0.0, 0
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            loss, n = window_loss(model, torch.from_numpy(ins[idx]), torch.from_numpy(tgts[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * n
            count += n
            st["step"] += 1
            bar.update(1)
        dt = time.perf_counter() - t0
        st["train_s"] += dt
        st["targets"] += count
        st["windows"] += len(order)
        st["epoch"] = epoch + 1
        row: dict[str, Any] = {"epoch": epoch + 1, "step": st["step"], "loss": loss_sum / max(count, 1),
                               "lr": sched.get_last_lr()[0], "epoch_s": round(dt, 2), "targets_per_s": round(count / dt, 1),
                               "windows_per_s": round(len(order) / dt, 1)}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.max_epochs:
            t1 = time.perf_counter()
            valid = evaluate_scorer(torch_scorer(model), data, "valid", cfg.max_len, cfg.eval_batch)
            st["eval_s"] += time.perf_counter() - t1
            row["valid"] = valid["metrics"]
            score = valid["metrics"].get("NDCG@10", 0.0)
            if st["best"] is None or score > st["best"]["NDCG@10"]:
                st["best"], st["best_epoch"], st["bad_evals"] = valid["metrics"], epoch + 1, 0
                save_checkpoint(out, model, data.catalog.item_ids, meta_extra())
            else:
                st["bad_evals"] += 1
                if st["bad_evals"] >= cfg.patience:
                    st["stopped"] = f"no better validation NDCG@10 in {cfg.patience} evaluations"
        if cfg.max_minutes is not None and time.perf_counter() - started > 60 * cfg.max_minutes and st["stopped"] is None:
            st["stopped"] = f"wall budget of {cfg.max_minutes} min"
        with log_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        bar.set_postfix(loss=f"{row['loss']:.3f}", ndcg10=f"{row.get('valid', {}).get('NDCG@10', float('nan')):.4f}",
                        best=f"{(st['best'] or {}).get('NDCG@10', 0):.4f}@{st['best_epoch']}", tgt_s=f"{row['targets_per_s']:.0f}")
        if progress:
            tqdm.write(json.dumps(row))
        save_state(out, cfg.to_json(), model.state_dict(), opt, sched, st, paths=_PATHS)
    bar.close()
    if st["stopped"] is None:
        st["stopped"] = f"max_epochs {cfg.max_epochs}"
    if st["best"] is None:  # no evaluation ran: keep the last weights
        save_checkpoint(out, model, data.catalog.item_ids, meta_extra())
    meta = read_config(out)
    meta.update(training={**_summary(st, n_params, threads, steps_per_epoch), "wall_s": round(time.perf_counter() - t_call, 1)})
    if command is not None:
        meta["command"] = command
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta["training"]


def _summary(st: dict[str, Any], n_params: int, threads: int, steps_per_epoch: int) -> dict[str, Any]:
    return {
        "epochs": st["epoch"], "steps": st["step"], "steps_per_epoch": steps_per_epoch, "chosen_epoch": st["best_epoch"],
        "valid_at_chosen_epoch": st["best"], "stopped": st["stopped"], "parameters": n_params,
        "train_s": round(st["train_s"], 1), "eval_s": round(st["eval_s"], 1),
        "targets_per_s": round(st["targets"] / st["train_s"], 1) if st["train_s"] else None,
        "windows_per_s": round(st["windows"] / st["train_s"], 1) if st["train_s"] else None,
        "torch_threads": threads, "cpu": cpu_name(), "torch": torch.__version__,
    }
