"""Fine-tuning with HatLLM's layer-wise masks: LoRA by default, full fine-tuning as an option.
Loss: next-token cross-entropy on the answer (target title + end marker) only."""

from __future__ import annotations

import json
import math
import random
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from hatllm_edge import checkpoint as ckpt
from hatllm_edge.batching import make_batch
from hatllm_edge.data import load_dataset
from hatllm_edge.masks import LayerSchedule
from hatllm_edge.model import BaseModelSpec, HatLLM, load_base

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class TrainConfig:
    out: Path
    n_in: int = 0
    n_cr: int = 0
    base: BaseModelSpec = field(default_factory=BaseModelSpec)
    dataset: str = "ml-100k"
    interactions: Path | None = None
    items: Path | None = None
    examples: int | None = 2048  # seeded sample of the training prefixes; None = all
    epochs: int = 1
    batch_size: int = 8
    lr: float = 5e-4
    warmup: float = 0.05
    weight_decay: float = 0.0
    full: bool = False  # full fine-tuning instead of LoRA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    max_history: int = 20
    bf16: bool = True  # bf16 autocast (AMX on this CPU); fp32 master weights
    seed: int = 0


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train and write a checkpoint folder to ``cfg.out``; returns the training summary."""
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.dataset, cfg.interactions, cfg.items)
    examples = data.train_examples(cfg.max_history, cfg.examples, cfg.seed)
    lm, tokenizer = load_base(cfg.base)
    schedule = LayerSchedule(lm.config.num_hidden_layers, cfg.n_in, cfg.n_cr)
    if cfg.full:
        trainable = lm
    else:
        from peft import LoraConfig, get_peft_model

        trainable = get_peft_model(
            lm,
            LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=list(LORA_TARGETS)),
        )
    model = HatLLM(trainable, schedule).train()
    meta = {
        "format": 1,
        "base": cfg.base.to_dict(),
        "model_type": lm.config.model_type,
        "schedule": schedule.to_dict(),
        "prompt": {"max_history": cfg.max_history, "eos_token": tokenizer.eos_token},
        "finetune": "full" if cfg.full else "lora",
        "train": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k not in ("base", "out")},
        "data": {"name": data.name, "users": len(data.sequences), "items": len(data.catalog), "train_examples": len(examples)},
    }
    from hatllm_edge.prompt import PromptBuilder

    prompts = PromptBuilder(tokenizer.backend_tokenizer, tokenizer.eos_token_id, cfg.max_history)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warm = max(1, int(cfg.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / warm) * max(0.0, (total - s) / max(1, total - warm)) if s >= warm else (s + 1) / warm
    )
    cfg.out.mkdir(parents=True, exist_ok=True)
    log_path = cfg.out / "train_log.jsonl"
    log = log_path.open("w", encoding="utf-8")
    rng = random.Random(cfg.seed)
    start, step, losses = time.time(), 0, []
    bar = tqdm(total=total, desc="train", disable=not progress, unit="step")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16)
    for epoch in range(cfg.epochs):
        order = examples[:]
        rng.shuffle(order)
        for i in range(0, len(order), cfg.batch_size):
            batch = make_batch(order[i : i + cfg.batch_size], data.catalog, prompts)
            with autocast:
                logits, _ = model(batch.input_ids, batch.position_ids, batch.masks, logits_index=batch.logits_index)
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch.labels.flatten(), ignore_index=-100)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
            sched.step()
            step += 1
            losses.append(loss.item())
            record = {"step": step, "epoch": epoch, "loss": round(loss.item(), 5), "lr": sched.get_last_lr()[0], "elapsed_s": round(time.time() - start, 2)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
            bar.update()
    bar.close()
    log.close()
    summary = {
        "steps": step,
        "examples_seen": len(examples) * cfg.epochs,
        "wall_s": round(time.time() - start, 1),
        "final_loss_avg20": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4),
        "peak_rss_mib": round(_peak_rss_mib(), 1),
        "torch_threads": torch.get_num_threads(),
    }
    meta["train_summary"] = summary
    ckpt.write_common(cfg.out, tokenizer, data.catalog, meta)
    if cfg.full:
        from safetensors.torch import save_file

        tied = lm.config.tie_word_embeddings  # a tied head is the embedding matrix: store it once
        state = {k: v.contiguous() for k, v in lm.state_dict().items() if not (tied and k == "lm_head.weight")}
        save_file(state, str(cfg.out / ckpt.FULL_WEIGHTS))
    else:
        trainable.save_pretrained(str(cfg.out / ckpt.ADAPTER_DIR))
    return summary
