"""hatllm-edge export: checkpoint -> quantised ONNX bundle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from hatllm_edge.cli.common import (
    CheckpointArg,
    DType,
    Embeddings,
    Int4Algo,
    QuantOpt,
    QuietOpt,
    app,
    run,
)


@app.command("export")
def export_cmd(
    checkpoint: CheckpointArg,
    out: Annotated[Path, typer.Argument(help="New folder for the ONNX bundle.")],
    quant: QuantOpt = None,
    dtype: Annotated[DType, typer.Option(help="fp32, or fp16 (for GPU).")] = DType("fp32"),
    int4_algo: Annotated[Optional[Int4Algo], typer.Option(help="int4 quantiser: rtn, hqq or gptq [default: rtn].")] = None,
    int4_block: Annotated[Optional[int], typer.Option(help="int4 block size [default: 16; Kendall's tau 0.84 vs 0.80 at 32, docs/results.md].")] = None,
    int4_8bit: Annotated[Optional[str], typer.Option("--int4-8bit", help="Comma-separated Linears kept at 8 bits in an int4 bundle ('none' for all 4-bit) [default: mlp.down_proj].")] = None,
    embeddings: Annotated[Optional[Embeddings], typer.Option(help="Embedding / LM head: int8 or float (default: int8 for int4 and int8, float for nf4 and none).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty OUT.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Merge the adapter, export to ONNX with one mask input per kind, quantise (4-bit weights;
    8-bit for Gemma 3, which ranks worse at 4)."""
    from hatllm_edge.engine.bundle import read_bundle_meta
    from hatllm_edge.export.checkpoint import export_checkpoint
    from hatllm_edge.export.quant.int4 import Int4Options

    eight_bit = None if int4_8bit is None else tuple(n for n in map(str.strip, int4_8bit.split(",")) if n not in ("", "none"))
    given = {"algo": int4_algo and int4_algo.value, "block_size": int4_block, "eight_bit": eight_bit}
    given = {k: v for k, v in given.items() if v is not None}
    int4 = Int4Options(**given) if given else None  # None: the defaults, and no complaint when the weights are not int4
    folder = run(export_checkpoint, checkpoint, out, quant=quant and quant.value, dtype=dtype.value, int4=int4, overwrite=overwrite,
                  progress=not quiet, embeddings=embeddings and embeddings.value)
    typer.echo(json.dumps({"bundle": str(folder), **(read_bundle_meta(folder).export or {})["sizes"]}))
