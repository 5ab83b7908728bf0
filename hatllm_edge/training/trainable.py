"""The model a run trains: the base LM, LoRA-wrapped (or whole, for full fine-tuning), started
from another run's adapter where asked, inside HatLLM's layer schedule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatllm_edge.core.errors import InputError
from hatllm_edge.core.formats import ADAPTER_DIR, ADAPTER_WEIGHTS
from hatllm_edge.core.masks import LayerSchedule
from hatllm_edge.training import checkpoint as ckpt
from hatllm_edge.training.config import TrainConfig
from hatllm_edge.training.model import HatLLM, load_base

LORA_TARGETS = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


def _load_init(trainable: Any, cfg: TrainConfig) -> None:
    """Start from another run's LoRA adapter: it must have been trained on the same base with the
    same LoRA shape, so every trainable weight is replaced and none is left at its initial value."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(cfg.init_from)
    meta = ckpt.read_meta(folder)
    if cfg.full or meta.finetune != "lora":
        raise InputError(f"--init-from {folder}: continues a LoRA run, so both must be LoRA "
                         f"(it is {meta.finetune}, this run {'full' if cfg.full else 'lora'})")
    if meta.base != cfg.base.to_dict():
        raise InputError(f"--init-from {folder}: trained on base {meta.base}, this run uses {cfg.base.to_dict()}; pass the same --base")
    shape = {k: meta.train.get(k) for k in ("lora_r", "lora_alpha", "lora_targets")}
    want = {k: getattr(cfg, k) for k in shape}
    if shape != want:
        raise InputError(f"--init-from {folder}: its adapter has {shape}, this run asks for {want}; use the same --lora-r and --lora-targets")
    weights = load_file(str(folder / ADAPTER_DIR / ADAPTER_WEIGHTS))
    result = set_peft_model_state_dict(trainable, weights)
    lora = {n for n, p in trainable.named_parameters() if p.requires_grad}
    missing = sorted(n for n in result.missing_keys if n in lora)
    if missing or result.unexpected_keys or len(weights) != len(lora):
        raise InputError(f"--init-from {folder}: its adapter does not fit this model "
                         f"(missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]})")


def trainable_model(cfg: TrainConfig) -> tuple[Any, Any, Any, HatLLM]:
    """The base LM, its tokenizer, what trains (the LoRA-wrapped LM, or the LM itself with
    ``full``; started from ``init_from`` where given) and the HatLLM around it, in train mode."""
    lm, tokenizer = load_base(cfg.base)
    schedule = LayerSchedule(lm.config.num_hidden_layers, cfg.n_in, cfg.n_cr)
    if cfg.full:
        trainable = lm
    else:
        from peft import LoraConfig, get_peft_model

        trainable = get_peft_model(lm, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                  target_modules=list(LORA_TARGETS[cfg.lora_targets])))
    if cfg.init_from:
        _load_init(trainable, cfg)
    if cfg.checkpointing:  # non-reentrant: the StepContext keyword reaches the recomputed layers, RNG state restored
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return lm, tokenizer, trainable, HatLLM(trainable, schedule).train()
