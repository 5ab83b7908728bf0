"""Fine-tuning with HatLLM's layer-wise masks: LoRA by default, full fine-tuning as an option.

Two ways to present the data (``mode``):

* ``window`` (default): each row is a window of a user's training sequence in the list
  template; every title after the window's first is an answer, trained in the same pass as
  the answer to the titles before it (:meth:`PromptBuilder.sequence`). ~20x fewer tokens per
  target than one prompt per target, with the same masks and logits per target.
* ``prompt``: one seeded prefix per row, the answer after the prompt (for comparison).

Loss over the answer tokens (title and end marker), averaged per token: cross-entropy over
the vocabulary (``ce``), or the masked-softmax loss over the tokens that continue a real title
(``msl``), which pairs with trie-renormalised beam search. Runs outlive a working session: the full training state is saved every
``save_every`` steps and ``--resume`` continues from it; every ``eval_every`` steps a fixed
seeded subset of validation users is ranked (full catalog, beam search) and the checkpoint
folder always holds the best step by validation NDCG@10; a finished run also writes its last
step to ``last/``.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from hatllm_edge.core.data import Dataset, Example, Window, load_dataset
from hatllm_edge.core.errors import InputError
from hatllm_edge.core.formats import (
    ADAPTER_DIR,
    CHECKPOINT_META,
    FULL_WEIGHTS,
    Decoding,
    ModelMeta,
)
from hatllm_edge.core.machine import HeapTrim, peak_rss_mib
from hatllm_edge.core.prompt import PromptBuilder
from hatllm_edge.ranking.trie import TitleTrie
from hatllm_edge.training import checkpoint as ckpt
from hatllm_edge.training.batching import (
    Batch,
    allowed_tokens,
    answer_nll,
    make_batch,
    make_window_batch,
    msl_nll,
)
from hatllm_edge.training.config import (
    EVAL_LOG_FILE,
    LAST_DIR,
    LOG_FILE,
    PATHS,
    PREDATED,
    RESUMABLE,
    TrainConfig,
)
from hatllm_edge.training.model import HatLLM, begin_token_id
from hatllm_edge.training.resume import (
    load_state,
    refuse_overwrite,
    restore,
    save_state,
)
from hatllm_edge.training.trainable import trainable_model
from hatllm_edge.training.validation import validate, validation_users


def training_units(data: Dataset, cfg: TrainConfig) -> list[Window] | list[Example]:
    if cfg.mode == "window":
        return data.train_windows(cfg.max_history, cfg.stride, cfg.examples, cfg.seed)
    if cfg.mode == "prompt":
        return data.train_examples(cfg.max_history, cfg.examples, cfg.seed)
    raise InputError(f"training mode {cfg.mode!r}: expected 'window' or 'prompt'")


def plan_batches(sizes: list[int], batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Every step's unit indices, all epochs, fixed by the seed (so a resumed run sees the same
    order). Each epoch is shuffled, then cut into blocks of 16 batches whose units are sorted
    by size before batching, so that a batch pads little; the batches of a block are shuffled."""
    steps: list[list[int]] = []
    for epoch in range(epochs):
        rng = random.Random(seed * 1_000_003 + epoch)
        order = list(range(len(sizes)))
        rng.shuffle(order)
        block = 16 * batch_size
        for b in range(0, len(order), block):
            chunk = sorted(order[b : b + block], key=lambda i: sizes[i])
            batches = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
            rng.shuffle(batches)
            steps += batches
    return steps


def unit_sizes(cfg: TrainConfig, units: list[Window] | list[Example], data: Dataset, prompts: PromptBuilder) -> list[int]:
    """Title tokens per training unit (a window's items, a prompt's history): what a batch pads to."""
    return [sum(len(prompts.title_ids(data.catalog.title(i))) for i in (u.items if cfg.mode == "window" else u.history))
            for u in units]


def batch_loss(model: HatLLM, batch: Batch, trie: TitleTrie | None, cfg: TrainConfig, forward: Any = None) -> torch.Tensor:
    """One step's loss, per answer token: the masked-softmax loss where a title trie is given
    (``msl``), else cross-entropy over the vocabulary. Run it under the step's autocast;
    ``forward``: the model's compiled forward, where compiled."""
    forward = forward or model
    device = model.head.weight.device
    allowed = allowed_tokens(batch, trie).to(device) if trie is not None else None  # read from the batch on the CPU
    batch = batch.to(device)
    inputs = (batch.input_ids, batch.position_ids, batch.masks)
    if allowed is not None:
        hidden, _ = forward(*inputs, logits_index=batch.logits_index, hidden=True)
        total = msl_nll(hidden, model.head, batch.labels, allowed, cfg.msl_temperature)
    else:
        logits, _ = forward(*inputs, logits_index=batch.logits_index)
        total = answer_nll(logits, batch.labels)
    return total / (batch.labels != -100).sum()


def optimise(model: HatLLM, batch: Batch, trie: TitleTrie | None, cfg: TrainConfig, optim: torch.optim.Optimizer,
             params: list[torch.nn.Parameter], forward: Any = None) -> torch.Tensor:
    """One optimiser step on ``batch`` (bf16 autocast as configured, gradients clipped at 1.0);
    returns the loss."""
    with torch.autocast(cfg.device, dtype=torch.bfloat16, enabled=cfg.bf16):
        loss = batch_loss(model, batch, trie, cfg, forward)
    optim.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optim.step()
    return loss.detach()


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train (or continue) and keep the best checkpoint in ``cfg.out``; returns the summary."""
    if cfg.mode == "window" and cfg.template != "list":
        raise InputError(f"--mode window trains every title of a window as an answer, which needs the 'list' template "
                         f"(got {cfg.template!r}); use --mode prompt with another template")
    saved = None
    if resume:
        # a field the saved run predates had its default then
        saved = load_state(cfg.out, cfg.to_dict(), RESUMABLE, then={**TrainConfig(out=cfg.out).to_dict(), **PREDATED},
                           paths=PATHS)
    else:
        refuse_overwrite(cfg.out)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device cuda: this torch ({torch.__version__}) sees no CUDA GPU; train on the CPU (--device cpu) "
                         "or install a CUDA build of torch on a machine with a GPU")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.dataset, cfg.interactions, cfg.items)
    units = training_units(data, cfg)
    lm, tokenizer, trainable, model = trainable_model(cfg)
    model.to(cfg.device)
    schedule = model.schedule
    forward = torch.compile(model, dynamic=True) if cfg.compile else model
    prompts = PromptBuilder(tokenizer.backend_tokenizer, tokenizer.eos_token_id, cfg.max_history, cfg.template,
                            begin_token_id(tokenizer))
    steps = plan_batches(unit_sizes(cfg, units, data, prompts), cfg.batch_size, cfg.epochs, cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    from transformers import get_cosine_schedule_with_warmup

    sched = get_cosine_schedule_with_warmup(optim, max(1, int(cfg.warmup * len(steps))), len(steps))
    valid_examples = validation_users(data, cfg.max_history, cfg.eval_users)
    run: dict[str, Any] = {"step": 0, "train_s": 0.0, "eval_s": 0.0, "tokens": 0, "targets": 0, "best": None}
    if saved is not None:
        with torch.no_grad():
            for n, v in restore(saved, optim, sched).items():
                named[n].copy_(v)
        run = saved["progress"]
    meta = ModelMeta(
        base=cfg.base.to_dict(), model_type=lm.config.model_type, schedule=schedule.to_dict(), prompt=prompts.meta(),
        finetune="full" if cfg.full else "lora", train={k: v for k, v in cfg.to_dict().items() if k not in ("base", "out")},
        data={"name": data.name, "users": len(data.sequences), "items": len(data.catalog), "train_units": len(units),
              "train_targets": sum(len(u.items) - u.first_target for u in units) if cfg.mode == "window" else len(units)},
        # what the run validates with is what the checkpoint ranks with, until `fuse --write` chooses
        decoding=Decoding(renormalise=cfg.loss == "msl"))
    cfg.out.mkdir(parents=True, exist_ok=True)

    def note_peak() -> float:  # the peak over every process of a resumed run
        run["peak_rss_mib"] = max(run.get("peak_rss_mib", 0.0), peak_rss_mib())
        return run["peak_rss_mib"]

    def checkpoint_state() -> None:
        note_peak()
        save_state(cfg.out, cfg.to_dict(), named, optim, sched, run, paths=PATHS)

    def write_checkpoint(valid: dict[str, Any] | None, folder: Path = cfg.out) -> None:
        # the weights first, hatllm.json last: a step's metadata (its validation) is never written
        # over weights that a kill kept from being saved
        folder.mkdir(parents=True, exist_ok=True)
        if cfg.full:
            from safetensors.torch import save_file

            tied = lm.config.tie_word_embeddings  # a tied head is the embedding matrix: store it once
            state = {k: v.contiguous() for k, v in lm.state_dict().items() if not (tied and k == "lm_head.weight")}
            save_file(state, str(folder / FULL_WEIGHTS))
        else:
            # the vocabulary is never resized and embeddings never adapted: saying so stops peft from
            # looking for the base's config.json (a GGUF has none), and from asking the Hub
            trainable.save_pretrained(str(folder / ADAPTER_DIR), save_embedding_layers=False)
            (folder / ADAPTER_DIR / "README.md").unlink(missing_ok=True)  # peft's model card: local paths, no facts
        ckpt.write_common(folder, tokenizer, data.catalog, replace(meta, validation=valid, train_summary=summary()))

    def summary() -> dict[str, Any]:
        return {
            "steps_done": run["step"],
            "steps_planned": len(steps),
            "epochs_done": round(run["step"] / max(1, len(steps)) * cfg.epochs, 3),
            "targets_seen": run["targets"],
            "tokens_seen": run["tokens"],
            "train_s": round(run["train_s"], 1),
            "eval_s": round(run["eval_s"], 1),
            "tokens_per_s": round(run["tokens"] / max(1e-9, run["train_s"]), 1),
            "targets_per_s": round(run["targets"] / max(1e-9, run["train_s"]), 2),
            "peak_rss_mib": round(note_peak(), 1),
            "torch_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if cfg.device == "cuda" else "cpu",
            **({"gpu_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)} if cfg.device == "cuda" else {}),
            "best": run["best"],
        }

    def evaluate_now() -> None:
        t0 = time.time()
        valid = validate(model, prompts, data, valid_examples, bf16=cfg.bf16, renormalise=cfg.loss == "msl")
        run["eval_s"] += time.time() - t0
        run["last_eval"] = run["step"]
        record = {"step": run["step"], **valid}
        with (cfg.out / EVAL_LOG_FILE).open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if run["best"] is None or valid["metrics"]["NDCG@10"] > run["best"]["metrics"]["NDCG@10"]:
            run["best"] = record
            write_checkpoint(record)

    log = (cfg.out / LOG_FILE).open("a" if resume else "w", encoding="utf-8")
    if not resume:
        (cfg.out / EVAL_LOG_FILE).unlink(missing_ok=True)
    deadline = time.time() + cfg.max_minutes * 60 if cfg.max_minutes else None
    build = make_window_batch if cfg.mode == "window" else make_batch
    trie = TitleTrie.build(data.catalog, prompts) if cfg.loss == "msl" else None
    bar = tqdm(total=len(steps), initial=run["step"], desc="train", disable=not progress, unit="step")
    recent: list[float] = []
    heap = HeapTrim()
    if cfg.init_from and cfg.eval_every and run.get("last_eval") is None:  # the start competes for "best" too
        evaluate_now()
        checkpoint_state()
    while run["step"] < len(steps) and not (deadline and time.time() > deadline):
        t0 = time.time()
        batch = build([units[i] for i in steps[run["step"]]], data.catalog, prompts)
        loss = optimise(model, batch, trie, cfg, optim, params, forward)
        sched.step()
        heap.step()
        run["train_s"] += time.time() - t0
        run["step"] += 1
        run["tokens"] += batch.tokens
        run["targets"] += batch.targets
        recent = (recent + [loss.item()])[-20:]
        log.write(json.dumps({"step": run["step"], "loss": round(loss.item(), 5), "lr": sched.get_last_lr()[0],
                              "tokens": batch.tokens, "slots": batch.input_ids.numel(), "targets": batch.targets, "step_s": round(time.time() - t0, 3),
                              "train_s": round(run["train_s"], 1)}) + "\n")
        log.flush()
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", tok_s=f"{run['tokens'] / run['train_s']:.0f}")
        bar.update()
        if cfg.eval_every and run["step"] % cfg.eval_every == 0:
            evaluate_now()
            checkpoint_state()
        elif cfg.save_every and run["step"] % cfg.save_every == 0:
            checkpoint_state()
    bar.close()
    log.close()
    finished = run["step"] >= len(steps)
    if finished and run.get("last_eval") != run["step"]:
        evaluate_now()
    checkpoint_state()
    if finished:  # the last step beside the best: a larger sample than the run's validation may prefer it
        evals = [json.loads(line) for line in (cfg.out / EVAL_LOG_FILE).read_text(encoding="utf-8").splitlines()]
        write_checkpoint(next((e for e in evals if e["step"] == run["step"]), None), cfg.out / LAST_DIR)
    if run["best"] is not None:  # refresh the summary in the best checkpoint's metadata
        path = cfg.out / CHECKPOINT_META
        written = ModelMeta.read(path)
        written.train_summary = summary()
        written.write(path)
    return {**summary(), "finished": finished}
