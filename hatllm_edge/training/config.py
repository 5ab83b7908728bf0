"""What a fine-tuning run is: its recipe (:class:`TrainConfig`), the files it writes, and which
fields may change when it resumes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hatllm_edge.core.prompt import Template
from hatllm_edge.core.recipe import LoraTargets, Loss, Mode
from hatllm_edge.engine.backend import Device
from hatllm_edge.training.model import BaseModelSpec

LOG_FILE = "train_log.jsonl"
EVAL_LOG_FILE = "valid_log.jsonl"
LAST_DIR = "last"  # a finished run's last step, as a checkpoint folder of its own
# Fields that may change on --resume: they do not change the recipe (compile: only a step's rounding;
# checkpointing recomputes the same layers with the same dropout masks; device: the same steps, but
# LoRA's dropout masks then come from the other device's generator and autocast rounds otherwise, so a
# run moved between CPU and GPU does not repeat a plain run bit for bit).
# out: the folder the state is read from, wherever it now lies.
RESUMABLE = ("out", "max_minutes", "eval_every", "eval_users", "save_every", "compile", "checkpointing", "device")
PATHS = ("interactions", "items", "init_from")  # compared by the file they name (a symlink, a relative path)
PREDATED = {"loss": "ce"}  # the value of a field whose default changed, for states saved before it existed


@dataclass(frozen=True)
class TrainConfig:
    out: Path
    n_in: int = 3  # the shipped schedule; 0 and 0 train plain causal
    n_cr: int = 3
    base: BaseModelSpec = field(default_factory=BaseModelSpec)
    dataset: str = "ml-100k"
    interactions: Path | None = None
    items: Path | None = None
    mode: Mode = "window"
    stride: int | None = None  # window mode: targets per window (default max_history)
    examples: int | None = None  # seeded sample of windows (or prompts); None = all
    epochs: int = 1
    batch_size: int = 8  # windows (or prompts) per step
    lr: float = 1e-3
    warmup: float = 0.03  # share of the steps; cosine decay after (transformers' schedule)
    weight_decay: float = 0.0
    full: bool = False  # full fine-tuning instead of LoRA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: LoraTargets = "all"
    max_history: int = 20
    template: Template = "list"  # window mode needs "list"; "instruct" reproduces the older prompt
    bf16: bool = True  # bf16 autocast; fp32 master weights
    compile: bool = False  # torch.compile the model (dynamic shapes: batches differ in width)
    checkpointing: bool = False  # recompute each decoder layer in the backward: a quarter of the memory, ~1.5x the time
    loss: Loss = "msl"  # the shipped recipe; runs saved before the field trained with "ce"
    msl_temperature: float = 1.0
    seed: int = 0
    init_from: str | None = None  # a LoRA checkpoint whose adapter starts the run (fresh optimiser and schedule)
    eval_every: int = 0  # steps between validations; 0 = only at the end
    eval_users: int = 100  # the fixed seeded subset of validation users
    save_every: int = 25  # steps between saved training states
    max_minutes: float | None = None  # stop (resumably) after this much training time
    device: Device = "cpu"  # cuda: the same recipe on a GPU (minutes a round instead of an hour on two cores)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["base"] = self.base.to_dict()
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
