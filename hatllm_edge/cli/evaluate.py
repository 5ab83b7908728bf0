"""hatllm-edge evaluate / fuse / popularity / analyze / fidelity / compare: quality, measured."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from hatllm_edge.app.models import bundle_builder
from hatllm_edge.cli.common import (
    AssistantWeightOpt,
    AssistOpt,
    Backend,
    BeamsOpt,
    Compute,
    ComputeOpt,
    DatasetOpt,
    Device,
    DeviceOpt,
    FirstOpt,
    InterOpt,
    ItemsOpt,
    KOpt,
    Quant,
    QuietOpt,
    Renormalise,
    RenormaliseOpt,
    SeedOpt,
    ShortlistOpt,
    Split,
    SplitOpt,
    ThreadsOpt,
    UsersOpt,
    app,
    command_line,
    number_list,
    print_table,
    run,
    writable_file,
    write_json,
)


@app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint folder (PyTorch) or ONNX bundle folder (the engine).")],
    split: SplitOpt = Split("test"),
    users: UsersOpt = 0,
    k: KOpt = 10,
    beams: BeamsOpt = None,
    bf16: Annotated[bool, typer.Option(help="Run the model with bf16 weights (faster on this CPU).")] = False,
    nf4: Annotated[bool, typer.Option(help="Run the checkpoint's decoder Linears as bitsandbytes NF4 (the reference the nf4 bundle mirrors).")] = False,
    batch_users: Annotated[int, typer.Option(min=1, help="Users whose beams run together in one batch.")] = 8,
    device: DeviceOpt = Device("cpu"),
    threads: ThreadsOpt = None,
    compute: ComputeOpt = Compute("auto"),
    dataset: DatasetOpt = "ml-100k",
    interactions: InterOpt = None,
    items: ItemsOpt = None,
    first: FirstOpt = False,
    seed: SeedOpt = 0,
    assist: AssistOpt = True,
    assistant: Annotated[Optional[Path], typer.Option(help="Fuse this SASRec checkpoint (sasrec.json + sasrec.onnx) instead of the model folder's own.")] = None,
    assistant_weight: AssistantWeightOpt = None,
    renormalise: RenormaliseOpt = None,
    exclude_history: Annotated[bool, typer.Option("--exclude-history/--include-history", help="Leave each user's history out of the ranked list, as rank does by default (default: included, the loo-full protocol); the output's 'history' field says which.")] = False,
    shortlist: ShortlistOpt = None,
    mixture: Annotated[Optional[bool], typer.Option("--mixture/--product", help="Fused lists: mix the two models' probabilities over the shortlist and the LLM's own top k (--assistant-weight is then the assistant's share, 0-1), or sum their weighted log-probabilities (default: the model's decoding).")] = None,
    search_errors: Annotated[bool, typer.Option(help="Score each missed target exactly and count the users whose target beats the list's k-th item: what the beam width costs, without ranking the whole catalog.")] = False,
    out: Annotated[Optional[Path], typer.Option(callback=writable_file, help="JSON file for metrics and per-user ranks.")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Full-catalog evaluation (loo-full): constrained beam search, HR@1/5/10, NDCG@5/10."""
    from hatllm_edge.evaluation.evaluate import EvalConfig
    from hatllm_edge.evaluation.evaluate import evaluate as run_eval

    cfg = EvalConfig(
        checkpoint=checkpoint, split=split.value, users=users or None, k=k, beams=beams, bf16=bf16, nf4=nf4, batch_users=batch_users,
        device=device.value, threads=threads, compute=compute.value,
        dataset=dataset, interactions=interactions, items=items, assist=assist, assistant=assistant,
        assistant_weight=assistant_weight, renormalise=renormalise, seed=seed, sample=not first, exclude_history=exclude_history,
        search_errors=search_errors, shortlist=shortlist, mixture=mixture,
    )
    result = run(run_eval, cfg, progress=not quiet)
    write_json(out, result)
    summary = {k: v for k, v in result.items() if k != "ranks"}
    if "search_errors" in summary:
        summary["search_errors"] = {k: v for k, v in summary["search_errors"].items() if k != "users"}
    typer.echo(json.dumps(summary))


@app.command()
def fuse(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint folder; tuned on the engine (its bundle is built on first use).")],
    assistant: Annotated[Path, typer.Option(help="SASRec checkpoint folder (sasrec.json + sasrec.onnx), e.g. models/sasrec-ml100k.")],
    weights: Annotated[str, typer.Option(help="Assistant weights to try, comma-separated (0 = the LLM alone; the shipped model chose 32).")] = "0,4,8,16,32",
    renormalise: Annotated[Renormalise, typer.Option(help="Trie renormalisation to try: off, on or both.")] = Renormalise("both"),
    users: UsersOpt = 300,
    first: FirstOpt = False,
    seed: SeedOpt = 0,
    beams: BeamsOpt = None,
    shortlists: Annotated[str, typer.Option(help="Shortlist sizes to try with each weight > 0, comma-separated (0: fused beam search; N: the assistant's N most likely items scored exactly).")] = "0",
    shares: Annotated[str, typer.Option(help="Mixtures to try: the assistant's shares, comma-separated, each between 0 and 1, each with every shortlist size > 0 (the two models' probabilities mixed over the shortlist and the LLM's own top 10). Empty: none.")] = "",
    quant: Annotated[Optional[Quant], typer.Option(help="Bundle the tuning runs on, built from the checkpoint on first use: int4, nf4, int8 or none (default int4, int8 for Gemma 3).")] = None,
    backend: Annotated[Backend, typer.Option(help="onnx (the engine) or torch (PyTorch fp32).")] = Backend("onnx"),
    threads: ThreadsOpt = None,
    dataset: DatasetOpt = "ml-100k",
    interactions: InterOpt = None,
    items: ItemsOpt = None,
    exclude_history: Annotated[bool, typer.Option("--exclude-history/--include-history", help="Rank with each user's history left out, as rank and serve do (default: included, the loo-full protocol; leave it out when the decoding written is for rank and serve on data without repeats).")] = False,
    batch_users: Annotated[int, typer.Option(min=1, help="Users whose beams run together in one batch (memory grows with it).")] = 8,
    write: Annotated[bool, typer.Option("--write", help="Store the winner in the checkpoint (hatllm.json 'decoding', assistant files copied in).")] = False,
    out: Annotated[Optional[Path], typer.Option(callback=writable_file, help="JSON file for the grid (metrics and per-user ranks).")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Choose the decoding on validation: trie renormalisation and the assistant's weight."""
    from hatllm_edge.app.rank import open_ranker
    from hatllm_edge.core.data import load_dataset
    from hatllm_edge.evaluation.tune import (
        TuneConfig,
        check_decoding_target,
        check_tune,
        tune,
        write_decoding,
    )

    grid = number_list("--weights", weights, float, "0,0.5,1")
    sizes = number_list("--shortlists", shortlists, int, "0,50")
    mixtures = number_list("--shares", shares, float, "0.8,0.9") if shares.strip() else ()
    modes = {"off": (False,), "on": (True,), "both": (False, True)}[renormalise.value]
    cfg = TuneConfig(assistant=assistant, weights=grid, renormalise=modes, users=users, seed=seed, beams=beams, sample=not first,
                     exclude_history=exclude_history, batch_users=batch_users, shortlists=sizes, shares=mixtures)

    def tune_and_write() -> dict:
        if write:
            check_decoding_target(checkpoint)
        check_tune(cfg, checkpoint)
        ranker = open_ranker(checkpoint, "cpu", quant and quant.value, backend.value, threads, not quiet, build=bundle_builder())
        result = tune(ranker, load_dataset(dataset, interactions, items), cfg, progress=not quiet)
        if write:
            write_decoding(checkpoint, assistant, result)
        return result

    result = run(tune_and_write)
    write_json(out, result)
    print_table(["renormalise", "fusion", "weight (mixture: share)", "shortlist", "NDCG@10", "HR@10", "s/user"],
                 [[str(r["renormalise"]).lower(), "mixture" if r.get("mixture") else "product", f"{r['assistant_weight']:g}",
                   str(r["shortlist"] or "-"), f"{r['metrics']['NDCG@10']:.4f}",
                   f"{r['metrics']['HR@10']:.4f}", f"{r['s_per_user']:.2f}"] for r in result["grid"]],
                 caption=f"validation, {result['users']} users, {result['backend']}")
    typer.echo(json.dumps({"chosen": result["chosen"], "users": result["users"], "written": write}))


@app.command()
def popularity(
    split: SplitOpt = Split("test"),
    dataset: DatasetOpt = "ml-100k",
    interactions: InterOpt = None,
    items: ItemsOpt = None,
    exclude_history: Annotated[bool, typer.Option("--exclude-history/--include-history", help="Per user, the most popular items not yet had (default: one list for all, history included: loo-full).")] = False,
    out: Annotated[Optional[Path], typer.Option(callback=writable_file, help="JSON file for metrics and per-user ranks.")] = None,
) -> None:
    """The most-popular baseline on the same split, for scale."""
    from hatllm_edge.evaluation.evaluate import popularity_baseline

    result = run(popularity_baseline, split.value, dataset, interactions, items, exclude_history)
    write_json(out, result)
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "ranks"}))


@app.command()
def analyze(
    checkpoints: Annotated[list[Path], typer.Argument(help="Checkpoint folders written by 'hatllm-edge train'.")],
    label: Annotated[Optional[list[str]], typer.Option(help="Name of each checkpoint, in order (default: folder name).")] = None,
    include_base: Annotated[bool, typer.Option(help="Also the untuned base model of the first checkpoint (label 'base').")] = True,
    examples: Annotated[int, typer.Option(help="Seeded sample of the split's examples (0 = all).")] = 64,
    split: SplitOpt = Split("valid"),
    batch_size: Annotated[int, typer.Option(help="Examples per forward pass.")] = 4,
    plain_masks: Annotated[bool, typer.Option("--plain-masks", help="Force the causal (OR) mask on every layer instead of the model's own.")] = False,
    dataset: DatasetOpt = "ml-100k",
    interactions: InterOpt = None,
    items: ItemsOpt = None,
    out_dir: Annotated[Path, typer.Option(help="Folder for skew.json and skew.png.")] = Path("analysis"),
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Attention skew (the HatLLM paper's diagnostic): per layer, attention mass of item tokens on their own item vs other items."""
    from hatllm_edge.training.analyze import AnalyzeConfig, skew_table
    from hatllm_edge.training.analyze import analyze as run_analyze

    cfg = AnalyzeConfig(
        checkpoints=tuple(checkpoints), labels=tuple(label or ()), include_base=include_base, examples=examples or None,
        split=split.value, seed=seed, batch_size=batch_size, plain_masks=plain_masks, out_dir=out_dir,
        dataset=dataset, interactions=interactions, items=items,
    )
    results = run(run_analyze, cfg, progress=not quiet)
    typer.echo(skew_table(results))
    typer.echo(f"wrote {out_dir / 'skew.json'} and {out_dir / 'skew.png'}")


@app.command()
def fidelity(
    reference: Annotated[Path, typer.Argument(help="Reference model: checkpoint (PyTorch fp32) or bundle.")],
    model: Annotated[Path, typer.Argument(help="Model to compare: bundle or checkpoint.")],
    users: Annotated[int, typer.Option(min=1, help="Users: a seeded sample of N (--seed).")] = 50,
    candidates: Annotated[int, typer.Option(min=2, help="Candidates per user (the target plus random items).")] = 100,
    split: SplitOpt = Split("test"),
    threads: ThreadsOpt = None,
    compute: Annotated[Compute, typer.Option(help="Engine arithmetic of MODEL (the reference always runs as stored): auto, native or int8.")] = Compute("auto"),
    renormalise: Annotated[Optional[bool], typer.Option("--renormalise/--no-renormalise", help="Score both with trie-renormalised steps or raw ones (default: the reference's decoding).")] = None,
    dataset: DatasetOpt = "ml-100k",
    interactions: InterOpt = None,
    items: ItemsOpt = None,
    seed: SeedOpt = 0,
    out: Annotated[Optional[Path], typer.Option(callback=writable_file, help="JSON file for the figures.")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Kendall's tau of candidate scores between a model and a reference (e.g. int4 vs fp32)."""
    from hatllm_edge.app.models import open_model
    from hatllm_edge.core.data import load_dataset
    from hatllm_edge.evaluation.fidelity import FidelityConfig, candidate_fidelity

    data = run(load_dataset, dataset, interactions, items)
    ref = run(open_model, reference, threads=threads, compute="native")  # the reference runs as stored
    other = run(open_model, model, threads=threads, compute=compute.value)
    cfg = FidelityConfig(split=split.value, users=users, candidates=min(candidates, len(data.catalog)), seed=seed,
                         renormalise=renormalise)
    result = {"reference": str(reference), "reference_backend": ref.label, "model": str(model), "model_backend": other.label,
              **run(candidate_fidelity, ref, other, data, cfg, not quiet)}
    write_json(out, result)
    typer.echo(json.dumps(result))


@app.command()
def compare(
    ctx: typer.Context,
    baseline: Annotated[Path, typer.Argument(help="Evaluation JSON (evaluate/popularity --out) of the reference run, or one row of a fuse grid (FUSE.json@w=32).")],
    runs: Annotated[list[Path], typer.Argument(help="Evaluation JSONs to compare with it, on the same users; a fuse --out grid adds each row (FILE@w=16 keeps one).")],
    samples: Annotated[int, typer.Option(min=1, help="Bootstrap resamples.")] = 2000,
    seed: SeedOpt = 0,
    out: Annotated[Optional[Path], typer.Option(callback=writable_file, help="JSON file for the table, the bootstrap and the command that made them.")] = None,
) -> None:
    """Metrics side by side, and a paired bootstrap over users of each run against the baseline."""
    from hatllm_edge.core.metrics import compare_runs

    result = run(compare_runs, [baseline, *runs], samples, seed)
    write_json(out, {"command": command_line(ctx), **result})
    typer.echo(result["table"])
    typer.echo(json.dumps(result["bootstrap"]))
