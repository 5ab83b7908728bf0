"""hatllm-edge bench: latency of every backend on the same workloads; start-up time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from hatllm_edge.app.models import bundle_builder
from hatllm_edge.cli.common import (
    CudaGraphOpt,
    DatasetOpt,
    Device,
    DeviceOpt,
    InterOpt,
    ItemsOpt,
    QuietOpt,
    SeedOpt,
    app,
    run,
    usage_error,
)


@app.command()
def bench(
    model: Annotated[Optional[Path], typer.Option(help="Checkpoint folder (default: the shipped HatLLM model); every bundle is built from it on first use.")] = None,
    device: DeviceOpt = Device("cpu"),
    cuda_graph: CudaGraphOpt = False,
    threads: Annotated[int, typer.Option(help="Threads for every backend (ONNX Runtime intra-op, torch).")] = 2,
    backends: Annotated[Optional[str], typer.Option(help="Comma-separated: torch-fp32, torch-bf16, torch-nf4, ort-<fp32|fp16|nf4|int4|int8>[-native|-int8|-block] (default: all for the device).")] = None,
    workloads: Annotated[Optional[str], typer.Option(help="Comma-separated cand<C>-h<H>-b<B> / top<K>-h<H>-b<B>, e.g. cand100-h20-b1,top10-h10-b1 (default: the 14 of docs/results.md).")] = None,
    seconds: Annotated[float, typer.Option(help="Timed seconds per backend and workload, after warm-up.")] = 6.0,
    min_repeats: Annotated[int, typer.Option(help="At least this many timed requests per workload.")] = 3,
    max_repeats: Annotated[int, typer.Option(help="At most this many timed requests per workload.")] = 30,
    out: Annotated[Path, typer.Option(help="Folder for bench.json and bench.png (ablation.json with --ablation).")] = Path("bench"),
    paired: Annotated[int, typer.Option(help="Rounds of the paired target check: on cand100-h20-b1 and top10-h10-b1 the PyTorch references and the chosen ORT backend take turns request by request, so the machine's drift hits them alike (0: off; the verdict then comes from the table).")] = 10,
    ablation: Annotated[bool, typer.Option("--ablation", help="Instead: each engine step undone in turn, on the first workload (default cand100-h20-b1).")] = False,
    variants: Annotated[Optional[str], typer.Option(help="With --ablation: only the variants whose name contains one of these comma-separated words (e.g. 'own length').")] = None,
    startup: Annotated[bool, typer.Option("--startup", help="Instead: wall time of whole 'hatllm-edge rank --model BUNDLE -q' processes (--min-repeats of them) on a 5-candidate request (interpreter, imports, session start-up, ranking), against the interpreter and the CLI import alone; the bundle is the model's int4 one (fp16 with --device cuda) or --model itself when it is a bundle.")] = False,
    dataset: DatasetOpt = "ml-100k",
    interactions: InterOpt = None,
    items: ItemsOpt = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Latency of every backend on the same seeded workloads, in one process: table, JSON, PNG."""
    from hatllm_edge.app.models import default_checkpoint
    from hatllm_edge.bench.backends import (
        CUDA_BACKENDS,
        DEFAULT_BACKENDS,
        TORCH_BACKENDS,
        ort_backend,
    )
    from hatllm_edge.bench.report import table, write_report
    from hatllm_edge.bench.timing import BenchConfig, run_bench
    from hatllm_edge.bench.workloads import Workload, default_workloads
    from hatllm_edge.core.data import load_dataset
    from hatllm_edge.engine.session import check_device

    device = device.value
    if threads < 1 or min_repeats < 1 or max_repeats < min_repeats or seconds < 0 or paired < 0:
        raise usage_error("need --threads >= 1, 1 <= --min-repeats <= --max-repeats, --seconds >= 0 and --paired >= 0")
    if variants and not ablation:
        raise usage_error("--variants picks ablation variants: add --ablation, or drop --variants")
    if ablation and startup:
        raise usage_error("--ablation and --startup are two different measurements: run them one at a time")
    run(check_device, device)  # before a bundle is built for a device this machine lacks
    chosen = [run(Workload.parse, w) for w in workloads.split(",")] if workloads else default_workloads()
    names = tuple(b.strip() for b in backends.split(",")) if backends else (CUDA_BACKENDS if device == "cuda" else DEFAULT_BACKENDS)
    for name in names:  # every name, before the first backend's minutes of work
        if name not in TORCH_BACKENDS:
            run(ort_backend, name)
    if out.exists() and not out.is_dir():
        raise usage_error(f"--out {out} is a file; bench writes a folder (bench.json, bench.png): give a folder's name")
    cfg = BenchConfig(checkpoint=model or default_checkpoint(), backends=names, workloads=tuple(chosen),
                      device=device, threads=threads, min_repeats=min_repeats, max_repeats=max_repeats, seconds=seconds, seed=seed,
                      paired=paired, build=bundle_builder(), cuda_graph=cuda_graph)  # type: ignore[arg-type]
    typer.echo(f"threads: {threads} per backend (ONNX Runtime intra-op / torch); device: {device}", err=True)
    if startup:
        _bench_startup(model, device, threads, min_repeats, out, quiet)
        return
    data = run(load_dataset, dataset, interactions, items)
    if ablation:
        from hatllm_edge.bench.ablation import run_ablation
        from hatllm_edge.bench.report import ablation_table

        workload = chosen[0] if workloads else Workload.parse("cand100-h20-b1")
        only = tuple(v.strip() for v in variants.split(",")) if variants else ()
        rows = run(run_ablation, cfg.checkpoint, data, workload, threads, max(min_repeats, 5), seed, not quiet, only, bundle_builder())
        out.mkdir(parents=True, exist_ok=True)
        (out / "ablation.json").write_text(json.dumps({"workload": workload.name, "threads": threads, "rows": rows}, indent=1) + "\n")
        typer.echo(ablation_table(rows))
        return
    report = run(run_bench, cfg, data, not quiet)
    json_path, png_path = write_report(report, out)
    typer.echo(table(report))
    typer.echo(json.dumps({"targets": report["targets"], "json": str(json_path), "png": str(png_path)}))


def _bench_startup(model: Optional[Path], device: str, threads: int, repeats: int, out: Path, quiet: bool) -> None:
    from hatllm_edge.app.rank import bundle_dtype, open_bundle
    from hatllm_edge.bench.startup import run_startup
    from hatllm_edge.core.data import Catalog
    from hatllm_edge.core.formats import CATALOG_FILE

    bundle = run(open_bundle, model, not quiet, bundle_builder(), dtype=bundle_dtype(device))  # type: ignore[arg-type]
    catalog = run(Catalog.from_jsonl, bundle / CATALOG_FILE)  # the titles only: no session to start
    half = len(catalog) // 2
    request = {"history": list(catalog.titles[: min(4, half)]), "candidates": list(catalog.titles[half : half + 5])}
    report = run(run_startup, bundle, request, repeats, threads, device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "startup.json").write_text(json.dumps(report, indent=1) + "\n")
    p50 = report["p50_s"]
    typer.echo(f"rank process p50 {p50['rank']:.2f} s (python alone {p50['python']:.2f} s, CLI import {p50['cli_import']:.2f} s, "
               f"engine {report['engine_ms_p50']:.0f} ms) over {repeats} runs -> {out / 'startup.json'}")
