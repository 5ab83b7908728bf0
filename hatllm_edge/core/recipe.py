"""The names a training run chooses between (torch-free, so the command line can offer them
without importing the training stack): one list each, for the configs and the CLI."""

from __future__ import annotations

from typing import Literal, get_args

Mode = Literal["window", "prompt"]  # every title of a window is a target / one target per prompt
MODES: tuple[Mode, ...] = get_args(Mode)
Loss = Literal["msl", "ce"]  # softmax over the title tree's allowed tokens / over the vocabulary
LOSSES: tuple[Loss, ...] = get_args(Loss)
LoraTargets = Literal["attention", "all"]  # LoRA on the attention projections / on every decoder Linear
LORA_TARGET_SETS: tuple[LoraTargets, ...] = get_args(LoraTargets)
LRSchedule = Literal["constant", "cosine"]  # SASRec: after the warm-up
LR_SCHEDULES: tuple[LRSchedule, ...] = get_args(LRSchedule)
