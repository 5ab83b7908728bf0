"""SASRec (Kang & McAuley 2018), the classic sequential baseline beside the LLM recommender.

Model: item embeddings (row 0 = padding), learned positional embeddings, causal self-attention
blocks (pre-LayerNorm, ReLU feed-forward), a final LayerNorm; the next-item logits are the dot
products of the last hidden state with every item embedding (shared input/output table).

Input convention (PyTorch and ONNX alike): ``item_ids`` [B, L] int64 of *catalog positions + 1*
(``catalog.item_ids[i]`` has id ``i + 1``), left-padded with 0, oldest first; only the last
``max_len`` columns are read. Positions are counted from the right (the newest item always sits
at position ``max_len - 1``) and padded keys are masked, so a row's scores do not depend on how
much padding it carries. Output ``scores`` [B, num_items]: log-probabilities of the next item,
column ``i`` = ``catalog.item_ids[i]``.

Training (``loo-full``): each user's training part ``seq[:-2]``; cross-entropy over the whole
catalog at every position (each target seeing up to ``max_len`` items before it), from windows
that cover every training target exactly once per epoch. Validation target ``seq[-2]`` given
``seq[:-2]`` picks the epoch (early stopping on NDCG@10 over all users); test target ``seq[-1]``
given ``seq[:-1]``. Ranking is over the whole catalog, history items included; ties go to the
item earlier in the catalog.

A checkpoint folder holds ``sasrec.json`` (architecture, item id order, training config and
outcome), ``model.safetensors`` (the best weights) and, while training, ``train_state.pt``
(model, optimiser, scheduler, RNG, early-stopping state) to resume from.

From the command line: ``hatllm-edge sasrec train|evaluate|export|report`` (``cli.py``).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from hatllm_edge.core.data import Catalog, Dataset, Example, Split, load_dataset
from hatllm_edge.core.errors import InputError
from hatllm_edge.core.formats import ASSISTANT_CONFIG as CONFIG_FILE
from hatllm_edge.core.formats import ASSISTANT_INPUT as ONNX_INPUT
from hatllm_edge.core.formats import ASSISTANT_ONNX as ONNX_FILE
from hatllm_edge.core.formats import ASSISTANT_OUTPUT as ONNX_OUTPUT
from hatllm_edge.core.formats import SASREC_FORMAT as FORMAT
from hatllm_edge.core.machine import cpu_name
from hatllm_edge.core.metrics import mean_metrics
from hatllm_edge.core.recipe import LR_SCHEDULES, LRSchedule
from hatllm_edge.ranking.assistant import (
    PAD,
    catalog_ids,
    left_pad,
    ort_session,
    read_config,
)
from hatllm_edge.training.resume import load_state, restore, save_state

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
LOG_FILE = "train_log.jsonl"
_MASKED = -1e9  # additive attention bias of a masked key (finite: no NaN, exact zero weight in fp32)


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class SASRecConfig:
    """The architecture."""

    num_items: int
    max_len: int = 50
    hidden: int = 64
    heads: int = 1
    blocks: int = 2
    dropout: float = 0.2

    def __post_init__(self) -> None:
        if self.num_items < 1 or self.max_len < 1 or self.blocks < 1:
            raise InputError(f"SASRec: num_items, max_len and blocks must be >= 1 ({self})")
        if self.hidden % self.heads:
            raise InputError(f"SASRec: hidden {self.hidden} is not a multiple of heads {self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"SASRec: dropout {self.dropout} not in [0, 1)")


class _Block(nn.Module):
    """Pre-LayerNorm causal self-attention + ReLU feed-forward, residual around each."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.attn_norm = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.ffn_norm = nn.LayerNorm(hidden)
        self.ffn_in = nn.Linear(hidden, hidden)
        self.ffn_out = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        att = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim)) + bias
        att = self.drop(torch.softmax(att, dim=-1))
        y = torch.matmul(att, v).transpose(1, 2).reshape(b, n, h)
        x = x + self.drop(self.out(y))
        return x + self.drop(self.ffn_out(self.drop(F.relu(self.ffn_in(self.ffn_norm(x))))))


class SASRec(nn.Module):
    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.num_items + 1, cfg.hidden, padding_idx=PAD)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_Block(cfg.hidden, cfg.heads, cfg.dropout) for _ in range(cfg.blocks))
        self.norm = nn.LayerNorm(cfg.hidden)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()

    def encode(self, item_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] left-padded ids -> [B, L'] hidden states, L' = min(L, max_len) (last columns)."""
        cfg = self.cfg
        seq = item_ids[:, -cfg.max_len :]
        n = seq.shape[1]
        idx = torch.arange(n, device=seq.device)
        pos = idx + (cfg.max_len - n)  # right-aligned: the newest item is always position max_len - 1
        x = self.item_emb(seq) * math.sqrt(cfg.hidden) + self.pos_emb(pos)[None]
        x = self.emb_drop(x)
        # key j visible to query i: j <= i and j is an item; every position sees itself, so a
        # padded row never has all keys masked (its output is unused; real rows never see it)
        keep = (idx[None, :] <= idx[:, None])[None] & (seq != PAD)[:, None, :]
        keep = keep | (idx[None, :] == idx[:, None])[None]
        bias = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, _MASKED)[:, None]
        for block in self.blocks:
            x = block(x, bias)
        return self.norm(x)

    def item_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., num_items] (catalog order; the padding row is not a candidate)."""
        return torch.matmul(hidden, self.item_emb.weight[1:].t())

    def next_item_log_probs(self, item_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] left-padded histories -> [B, num_items] log-probabilities of the next item."""
        return torch.log_softmax(self.item_logits(self.encode(item_ids)[:, -1]), dim=-1)

    def forward(self, item_ids: torch.Tensor) -> torch.Tensor:
        return self.next_item_log_probs(item_ids)


# --------------------------------------------------------------------------- data


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


# --------------------------------------------------------------------------- evaluation

Scorer = Callable[[np.ndarray], np.ndarray]  # [B, L] int64 model ids -> [B, num_items] scores


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each row's target (a catalog position) among all items; ties go to the
    item earlier in the catalog (as a stable sort by descending score would order them)."""
    scores = np.asarray(scores)
    rows = np.arange(len(targets))
    t = scores[rows, targets][:, None]
    earlier = np.arange(scores.shape[1])[None, :] < targets[:, None]
    return ((scores > t) | ((scores == t) & earlier)).sum(axis=1)


def rank_examples(scorer: Scorer, examples: Sequence[Example], catalog: Catalog, max_len: int, batch_size: int = 256,
                  exclude: Callable[[Example], set[int]] | None = None) -> dict[str, int]:
    """User -> 0-based rank of the target in the whole catalog; ``exclude`` (example -> catalog
    indices) leaves those items out of the ranking, as the LLM's search does with the history."""
    out: dict[str, int] = {}
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        x = left_pad([catalog_ids(catalog, ex.history) for ex in chunk], max_len)
        scores = scorer(x)
        if scores.shape != (len(chunk), len(catalog)):
            raise ValueError(f"scorer returned shape {scores.shape}, expected {(len(chunk), len(catalog))}")
        if exclude is not None:
            scores = np.array(scores, dtype=np.float64)
            for row, ex in enumerate(chunk):
                scores[row, sorted(exclude(ex))] = -np.inf
        ranks = target_ranks(scores, np.array([catalog.index(ex.target) for ex in chunk]))
        out.update({ex.user_id: int(r) for ex, r in zip(chunk, ranks)})
    return out


def torch_scorer(model: SASRec) -> Scorer:
    def score(x: np.ndarray) -> np.ndarray:
        was = model.training
        model.eval()
        try:
            with torch.inference_mode():
                return model.next_item_log_probs(torch.from_numpy(x)).numpy()
        finally:
            model.train(was)

    return score


def onnx_scorer(path: Path, threads: int | None = None) -> Scorer:
    sess = ort_session(path, threads)
    return lambda x: sess.run([ONNX_OUTPUT], {ONNX_INPUT: x})[0]


def evaluate_scorer(scorer: Scorer, data: Dataset, split: Split, max_len: int, batch_size: int = 256,
                    exclude_history: bool = False) -> dict[str, Any]:
    """loo-full metrics of ``split`` over every user with a history, and the per-user ranks;
    ``exclude_history``: each user's earlier items are left out of their ranking."""
    examples = data.split(split, max_len)
    exclude = (lambda ex: data.seen(ex.user_id, split)) if exclude_history else None
    ranks = rank_examples(scorer, examples, data.catalog, max_len, batch_size, exclude)
    return {"split": split, "history": "excluded" if exclude_history else "included", "users": len(ranks),
            "metrics": mean_metrics(list(ranks.values())), "ranks": ranks}


# --------------------------------------------------------------------------- checkpoints


def _check_catalog(meta: dict[str, Any], catalog: Catalog, where: Path) -> None:
    if tuple(meta["item_ids"]) != catalog.item_ids:
        raise InputError(f"{where}: the checkpoint's item ids differ from this data set's catalog (order or content)")


def save_checkpoint(folder: Path, model: SASRec, item_ids: Sequence[str], extra: dict[str, Any] | None = None) -> None:
    """``model.safetensors`` + ``sasrec.json`` (architecture, item id order, ``extra``)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if len(item_ids) != model.cfg.num_items:
        raise ValueError(f"{len(item_ids)} item ids for a model of {model.cfg.num_items} items")
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(folder / WEIGHTS_FILE)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "model": asdict(model.cfg), "item_ids": list(item_ids), **(extra or {})}
    tmp = folder / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    tmp.replace(folder / CONFIG_FILE)




def load_checkpoint(folder: Path) -> tuple[SASRec, dict[str, Any]]:
    """The model (eval mode) and its ``sasrec.json``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_config(folder)
    model = SASRec(SASRecConfig(**meta["model"]))
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return model.eval(), meta


# --------------------------------------------------------------------------- training


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
        saved = load_state(out, cfg.to_json(), _RESUMABLE)
        model.load_state_dict(restore(saved, opt, sched))
        st = saved["progress"]
        st["stopped"] = None  # a larger budget may continue a run that stopped; patience still counts
    else:
        log_path.write_text("", encoding="utf-8")
    n_params = sum(p.numel() for p in model.parameters())
    threads = torch.get_num_threads()
    meta_extra = lambda: {"dataset": data.name, "train_config": cfg.to_json(), "training": _summary(st, cfg, n_params, threads, steps_per_epoch)}  # noqa: E731
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
        save_state(out, cfg.to_json(), model.state_dict(), opt, sched, st)
    bar.close()
    if st["stopped"] is None:
        st["stopped"] = f"max_epochs {cfg.max_epochs}"
    if st["best"] is None:  # no evaluation ran: keep the last weights
        save_checkpoint(out, model, data.catalog.item_ids, meta_extra())
    meta = read_config(out)
    meta.update(training={**_summary(st, cfg, n_params, threads, steps_per_epoch), "wall_s": round(time.perf_counter() - t_call, 1)})
    if command is not None:
        meta["command"] = command
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta["training"]


def _summary(st: dict[str, Any], cfg: TrainConfig, n_params: int, threads: int, steps_per_epoch: int) -> dict[str, Any]:
    return {
        "epochs": st["epoch"], "steps": st["step"], "steps_per_epoch": steps_per_epoch, "chosen_epoch": st["best_epoch"],
        "valid_at_chosen_epoch": st["best"], "stopped": st["stopped"], "parameters": n_params,
        "train_s": round(st["train_s"], 1), "eval_s": round(st["eval_s"], 1),
        "targets_per_s": round(st["targets"] / st["train_s"], 1) if st["train_s"] else None,
        "windows_per_s": round(st["windows"] / st["train_s"], 1) if st["train_s"] else None,
        "torch_threads": threads, "cpu": cpu_name(), "torch": torch.__version__,
    }


def evaluate_checkpoint(
    folder: Path, split: Split, dataset: str = "ml-100k", interactions: Path | None = None, items: Path | None = None,
    backend: str = "torch", onnx_path: Path | None = None, threads: int | None = None, batch_size: int = 256,
    exclude_history: bool = False,
) -> dict[str, Any]:
    """loo-full evaluation of a checkpoint on the PyTorch model or its ONNX graph (``backend``
    "onnx": ``onnx_path`` or the folder's ``sasrec.onnx``). The result has ``model``, ``split``,
    ``users``, ``metrics`` and per-user ``ranks`` (full-catalog, 0-based): the JSON that
    :func:`hatllm_edge.core.metrics.compare_runs` reads."""
    folder = Path(folder)
    meta = read_config(folder)
    data = load_dataset(dataset, interactions, items)
    _check_catalog(meta, data.catalog, folder)
    max_len = meta["model"]["max_len"]
    if backend not in ("torch", "onnx"):
        raise InputError(f"backend {backend!r}: expected 'torch' or 'onnx'")
    if threads is not None and threads < 1:
        raise InputError(f"threads {threads} must be at least 1")
    graph = Path(onnx_path) if onnx_path else folder / ONNX_FILE
    if backend == "onnx" and not graph.is_file():
        raise InputError(f"{graph}: no ONNX file (export the checkpoint first: hatllm-edge sasrec export {folder})")
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    scorer = torch_scorer(load_checkpoint(folder)[0]) if backend == "torch" else onnx_scorer(graph, threads)
    res = evaluate_scorer(scorer, data, split, max_len, batch_size, exclude_history)
    wall = time.perf_counter() - t0
    return {"model": "sasrec", "checkpoint": str(folder), "backend": backend, "split": split, "history": res["history"],
            "users": res["users"],
            "metrics": res["metrics"], "wall_s": round(wall, 3), "ranks": res["ranks"]}


# --------------------------------------------------------------------------- ONNX


class _NextItem(nn.Module):
    def __init__(self, model: SASRec) -> None:
        super().__init__()
        self.model = model

    def forward(self, item_ids: torch.Tensor) -> torch.Tensor:
        return self.model.next_item_log_probs(item_ids)


def export_model_onnx(model: SASRec, path: Path, opset: int = 17) -> Path:
    """``item_ids`` [B, L] int64 (left-padded, any L) -> ``scores`` [B, num_items] log-probabilities."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was = model.training
    wrapper = _NextItem(model).eval()  # the exporter restores the wrapper's mode on every submodule
    example = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int64).clamp(max=model.cfg.num_items)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy (TorchScript) exporter's deprecation notice
        torch.onnx.export(
            wrapper, (example,), str(path), dynamo=False, opset_version=opset,
            input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
            dynamic_axes={ONNX_INPUT: {0: "batch", 1: "length"}, ONNX_OUTPUT: {0: "batch"}},
        )
    model.train(was)
    return path


def onnx_parity(model: SASRec, path: Path, batch: int = 8, seed: int = 0) -> dict[str, float]:
    """Max abs difference of ONNX Runtime vs PyTorch log-probabilities on seeded left-padded
    histories of several lengths (1 .. max_len + 5, so the cut to ``max_len`` is covered)."""
    rng = np.random.default_rng(seed)
    scorer, ref = onnx_scorer(path), torch_scorer(model)
    worst = 0.0
    for length in sorted({1, 3, model.cfg.max_len, model.cfg.max_len + 5}):
        rows = [rng.integers(1, model.cfg.num_items + 1, size=int(rng.integers(1, length + 1))).tolist() for _ in range(batch)]
        x = left_pad(rows, length)
        worst = max(worst, float(np.abs(scorer(x) - ref(x)).max()))
    return {"max_abs_diff": worst}


def export_checkpoint_onnx(folder: Path, out: Path | None = None, opset: int = 17, check: bool = True) -> dict[str, Any]:
    """Export a checkpoint folder's model to ONNX (default: ``<folder>/sasrec.onnx``); with
    ``check``, compare ONNX Runtime to PyTorch (raises when they differ by more than 1e-4)."""
    folder = Path(folder)
    model, meta = load_checkpoint(folder)
    path = export_model_onnx(model, Path(out) if out else folder / ONNX_FILE, opset)
    report: dict[str, Any] = {"onnx": str(path), "opset": opset, "bytes": path.stat().st_size,
                              "input": ONNX_INPUT, "output": ONNX_OUTPUT, "num_items": meta["model"]["num_items"]}
    if check:
        report.update(onnx_parity(model, path))
        if report["max_abs_diff"] > 1e-4:
            raise RuntimeError(f"{path}: ONNX Runtime differs from PyTorch by {report['max_abs_diff']:.2e}")
    return report


# --------------------------------------------------------------------------- report


RANKS_NOTE = "0-based rank of the target among all catalog items (history not removed; ties by catalog order)"


def report(
    folder: Path, out: Path, dataset: str = "ml-100k", interactions: Path | None = None, items: Path | None = None,
    threads: int | None = None, command: str | None = None,
) -> dict[str, Any]:
    """The results of a trained checkpoint, in one go: validation and test on PyTorch, the ONNX
    export (``<folder>/sasrec.onnx``) checked against PyTorch, and test on ONNX Runtime (its
    metrics and how many users get the same rank). Writes ``out`` (test, readable by
    :func:`hatllm_edge.core.metrics.compare_runs`), ``<out stem>_valid.json`` beside it and, when the
    checkpoint has a training log, ``<out stem>_train_log.jsonl`` and ``<out stem>_curve.png``.
    Returns what ``out`` holds."""
    folder, out = Path(folder), Path(out)
    meta = read_config(folder)
    data_args = (dataset, interactions, items)
    valid = evaluate_checkpoint(folder, "valid", *data_args, threads=threads)
    test = evaluate_checkpoint(folder, "test", *data_args, threads=threads)
    onnx = export_checkpoint_onnx(folder)
    test_ort = evaluate_checkpoint(folder, "test", *data_args, backend="onnx", threads=threads)
    same = sum(test_ort["ranks"][u] == r for u, r in test["ranks"].items())
    onnx.update(test_metrics=test_ort["metrics"], test_same_rank_users=same, test_users=test["users"], test_wall_s=test_ort["wall_s"])
    common = {"model": "sasrec", "checkpoint": str(folder), "config": meta["model"], "train_config": meta.get("train_config"),
              "training": meta.get("training"), "train_command": meta.get("command"), "command": command, "ranks_note": RANKS_NOTE}
    result = {**common, "split": "test", "users": test["users"], "metrics": test["metrics"],
              "valid_metrics": valid["metrics"], "eval_wall_s": test["wall_s"], "onnx": onnx, "ranks": test["ranks"]}
    result_valid = {**common, "split": "valid", "users": valid["users"], "metrics": valid["metrics"], "eval_wall_s": valid["wall_s"],
                    "ranks": valid["ranks"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    out.with_name(out.stem + "_valid.json").write_text(json.dumps(result_valid, indent=1) + "\n", encoding="utf-8")
    log = folder / LOG_FILE
    if log.is_file():
        text = log.read_text(encoding="utf-8")
        out.with_name(out.stem + "_train_log.jsonl").write_text(text, encoding="utf-8")
        plot_training([json.loads(line) for line in text.splitlines() if line.strip()], meta, out.with_name(out.stem + "_curve.png"))
    return result


def plot_training(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> Path:
    """The learning curve from ``train_log.jsonl`` rows: validation NDCG@10 and HR@10 per
    evaluated epoch, the chosen epoch, and the training loss on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    ev = [r for r in rows if "valid" in r]
    ax.plot([r["epoch"] for r in ev], [r["valid"]["NDCG@10"] for r in ev], label="valid NDCG@10")
    ax.plot([r["epoch"] for r in ev], [r["valid"]["HR@10"] for r in ev], label="valid HR@10")
    chosen = (meta.get("training") or {}).get("chosen_epoch")
    if chosen:
        ax.axvline(chosen, color="grey", ls=":", label=f"chosen epoch {chosen}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("metric (all users)")
    ax2 = ax.twinx()
    ax2.plot([r["epoch"] for r in rows], [r["loss"] for r in rows], color="k", alpha=0.4, label="train loss")
    ax2.set_ylabel("train cross-entropy")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="center right", fontsize=8)
    ax.set_title(f"SASRec on {meta.get('dataset', 'ml-100k')} loo-full")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
