"""hatllm-edge rank: one user's ranking, as JSON or a table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from hatllm_edge.app.models import bundle_builder
from hatllm_edge.cli.common import (
    Backend,
    BeamsOpt,
    Compute,
    ComputeOpt,
    CudaGraphOpt,
    Device,
    DeviceOpt,
    DType,
    Quant,
    QuietOpt,
    ShortlistOpt,
    ThreadsOpt,
    app,
    bounded,
    print_table,
    run,
)
from hatllm_edge.core.limits import MAX_K


@app.command()
def rank(
    user: Annotated[Path, typer.Argument(help='JSON: {"history": \\[ids or titles, oldest first], "candidates"?: \\[...], "k"?: N, "beams"?: N}.')],
    model: Annotated[Optional[Path], typer.Option(help="ONNX bundle or checkpoint folder (default: the shipped HatLLM model).")] = None,
    k: Annotated[Optional[int], typer.Option(callback=bounded("--k", MAX_K, "the list length"), help=f"List length, 1-{MAX_K} and at most the catalog size (overrides the file's k; default 10).")] = None,
    beams: BeamsOpt = None,
    shortlist: ShortlistOpt = None,
    device: DeviceOpt = Device("cpu"),
    quant: Annotated[Optional[Quant], typer.Option(help="Bundle built on first use from a checkpoint: int4, nf4, int8 or none (default int4, int8 for Gemma 3).")] = None,
    dtype: Annotated[Optional[DType], typer.Option(help="Float type of that bundle: fp16 (default with --device cuda) or fp32 (default on the CPU).")] = None,
    cuda_graph: CudaGraphOpt = False,
    compute: ComputeOpt = Compute("auto"),
    backend: Annotated[Backend, typer.Option(help="onnx (the engine) or torch (PyTorch, from a checkpoint).")] = Backend("onnx"),
    threads: ThreadsOpt = None,
    length_normalise: Annotated[bool, typer.Option("--length-normalise", help="Candidates: score per answer token (the mean log-probability) instead of the title's total, so long titles are not penalised.")] = False,
    exclude_history: Annotated[bool, typer.Option("--exclude-history/--include-history", help="Leave the user's history out of the list (default; the search finds k other items), or keep it (as the loo-full evaluation does).")] = True,
    assist: Annotated[Optional[bool], typer.Option("--assist/--no-assist", help="Fuse the model's collaborative assistant (SASRec), where it ships one (default: the request's 'assist', else on).")] = None,
    table: Annotated[bool, typer.Option("--table", help="Print a table instead of JSON.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Rank for one user: full-catalog top-k, or the given candidates; prints JSON or a table."""
    from hatllm_edge.app.rank import RankOptions, run_rank

    opts = RankOptions(model=model, k=k, beams=beams, device=device.value, quant=quant and quant.value,
                       dtype=dtype and dtype.value, cuda_graph=cuda_graph, backend=backend.value,
                       compute=compute.value, threads=threads, normalize=length_normalise, exclude_history=exclude_history,  # type: ignore[arg-type]
                       assist=assist, shortlist=shortlist)
    result = run(run_rank, user, opts, not quiet, bundle_builder())
    if table:
        decoding = ", renormalised" if result["renormalise"] else ""
        if result["assistant_weight"]:
            decoding += (f", mixture, assistant share {result['assistant_weight']:g}" if result.get("mixture")
                         else f", assistant weight {result['assistant_weight']:g}")
        decoding += f", shortlist {result['shortlist']}" if result.get("shortlist") else ""
        print_table(["rank", "item_id", "score", "title"],
                     [[row["rank"], row["item_id"], f"{row['score']:.3f}", row["title"]] for row in result["results"]],
                     caption=f"{result['mode']}, {result['backend']}{decoding}, {result['latency_ms']:.1f} ms")
    else:
        typer.echo(json.dumps(result, ensure_ascii=False, indent=1))
