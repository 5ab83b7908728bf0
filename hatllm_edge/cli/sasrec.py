"""hatllm-edge sasrec: the classic sequential baseline (also the shipped assistant)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from hatllm_edge.cli.common import (
    Backend,
    DatasetOpt,
    InterOpt,
    ItemsOpt,
    LRSchedule,
    QuietOpt,
    SeedOpt,
    Split,
    SplitOpt,
    app,
    command_line,
    run,
    writable_file,
    write_json,
)

# --------------------------------------------------------------------------- sasrec

sasrec_app = typer.Typer(no_args_is_help=True, help="SASRec, the classic sequential baseline (hatllm_edge/training/sasrec/): train, evaluate, export, report.")
app.add_typer(sasrec_app, name="sasrec")
SASRecCheckpointArg = Annotated[Path, typer.Argument(help="Checkpoint folder written by 'hatllm-edge sasrec train'.")]
SASRecThreadsOpt = Annotated[Optional[int], typer.Option(min=1, help="Threads (torch intra-op; ONNX Runtime's too with --backend onnx). Default: their choice.")]
ReportThreadsOpt = Annotated[Optional[int], typer.Option(min=1, help="Threads for PyTorch and ONNX Runtime (default: their choice).")]


@sasrec_app.command("train")
def sasrec_train(
    ctx: typer.Context,
    out: Annotated[Path, typer.Argument(help="Folder for the checkpoint (best weights by validation NDCG@10).")],
    dataset: DatasetOpt = "ml-100k",
    interactions: InterOpt = None,
    items: ItemsOpt = None,
    max_len: Annotated[int, typer.Option(help="History items the model reads (the most recent).")] = 50,
    hidden: Annotated[int, typer.Option(help="Hidden size (item embeddings, attention, feed-forward).")] = 64,
    heads: Annotated[int, typer.Option(help="Attention heads (--hidden must be a multiple of it).")] = 1,
    blocks: Annotated[int, typer.Option(help="Self-attention blocks.")] = 2,
    dropout: Annotated[float, typer.Option(help="Dropout rate, in [0, 1).")] = 0.2,
    stride: Annotated[int, typer.Option(help="Loss positions per training window, 1 to --max-len (smaller: more context per target, more compute).")] = 50,
    batch_size: Annotated[int, typer.Option(help="Windows per step.")] = 128,
    lr: Annotated[float, typer.Option(help="Adam learning rate after the warm-up.")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="Adam weight decay.")] = 0.0,
    schedule: Annotated[LRSchedule, typer.Option(help="After the linear warm-up: constant, or cosine (to --max-epochs).")] = LRSchedule("constant"),
    warmup_steps: Annotated[int, typer.Option(help="Steps of linear warm-up.")] = 100,
    max_epochs: Annotated[int, typer.Option(help="Epochs at most.")] = 200,
    patience: Annotated[int, typer.Option(help="Stop after this many evaluations without a better validation NDCG@10.")] = 20,
    eval_every: Annotated[int, typer.Option(help="Epochs between validation evaluations.")] = 1,
    max_minutes: Annotated[Optional[float], typer.Option(help="Wall-clock budget of the training loop, in minutes (default: none).")] = None,
    eval_batch: Annotated[int, typer.Option(help="Users per batch in the validation evaluation.")] = 256,
    threads: Annotated[Optional[int], typer.Option(min=1, help="torch intra-op threads (default: torch's choice).")] = None,
    seed: SeedOpt = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/train_state.pt (same flags; only --max-epochs, --patience, --max-minutes, --threads and --eval-batch may change).")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train SASRec on the loo-full split; keep the best weights by validation NDCG@10."""
    from hatllm_edge.training import sasrec

    cfg = run(
        sasrec.TrainConfig, out=out, dataset=dataset, interactions=interactions, items=items, max_len=max_len, hidden=hidden,
        heads=heads, blocks=blocks, dropout=dropout, stride=stride, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        schedule=schedule.value, warmup_steps=warmup_steps, max_epochs=max_epochs, patience=patience, eval_every=eval_every,
        max_minutes=max_minutes, eval_batch=eval_batch, threads=threads, seed=seed,
    )
    summary = run(sasrec.train, cfg, resume=resume, progress=not quiet, command=command_line(ctx))
    typer.echo(json.dumps(summary))


@sasrec_app.command("evaluate")
def sasrec_evaluate(
    ctx: typer.Context,
    checkpoint: SASRecCheckpointArg,
    split: SplitOpt = Split("test"),
    backend: Annotated[Backend, typer.Option(help="torch (the checkpoint) or onnx (its exported graph, ONNX Runtime).")] = Backend("torch"),
    onnx: Annotated[Optional[Path], typer.Option(help="ONNX file for --backend onnx (default: CHECKPOINT/sasrec.onnx).")] = None,
    threads: SASRecThreadsOpt = None,
    dataset: DatasetOpt = "ml-100k",
    interactions: InterOpt = None,
    items: ItemsOpt = None,
    out: Annotated[Optional[Path], typer.Option(callback=writable_file, help="JSON file for metrics and per-user ranks (readable by 'hatllm-edge compare').")] = None,
    exclude_history: Annotated[bool, typer.Option("--exclude-history/--include-history", help="Leave each user's history out of their ranking, as rank does by default (default: included, the loo-full protocol); the output's 'history' field says which.")] = False,
) -> None:
    """Full-catalog evaluation (loo-full): HR@1/5/10, NDCG@5/10 and per-user ranks."""
    from hatllm_edge.training import sasrec

    result = run(sasrec.evaluate_checkpoint, checkpoint, split.value, dataset, interactions, items, backend.value, onnx, threads,
                  exclude_history=exclude_history)
    result["command"] = command_line(ctx)
    write_json(out, result)
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "ranks"}))


@sasrec_app.command("export")
def sasrec_export(
    checkpoint: SASRecCheckpointArg,
    out: Annotated[Optional[Path], typer.Option(callback=writable_file, help="ONNX file (default: CHECKPOINT/sasrec.onnx).")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
) -> None:
    """ONNX graph (item_ids [B, L] -> scores [B, num_items]), checked against PyTorch."""
    from hatllm_edge.training import sasrec

    typer.echo(json.dumps(run(sasrec.export_checkpoint_onnx, checkpoint, out, opset)))


@sasrec_app.command("report")
def sasrec_report(
    ctx: typer.Context,
    checkpoint: SASRecCheckpointArg,
    out: Annotated[Path, typer.Option(callback=writable_file, help="Results JSON (test); <stem>_valid.json, <stem>_train_log.jsonl and <stem>_curve.png go beside it.")],
    threads: ReportThreadsOpt = None,
    dataset: DatasetOpt = "ml-100k",
    interactions: InterOpt = None,
    items: ItemsOpt = None,
) -> None:
    """Validation and test metrics, the ONNX export checked on the test split, and the results files."""
    from hatllm_edge.training import sasrec

    result = run(sasrec.report, checkpoint, out, dataset, interactions, items, threads, command_line(ctx))
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "ranks"}))
