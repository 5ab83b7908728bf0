"""The ``hatllm-edge`` command line: one module per command group, registered on one Typer app
(:mod:`hatllm_edge.cli.common`). Commands import the library inside their bodies, so that
``--help`` and a ranking from a built bundle never pay for torch."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Annotated

import typer

from hatllm_edge import __version__

# Importing a command module registers its commands (listed in --help in common.PIPELINE order).
from hatllm_edge.cli import bench, evaluate, export, rank, sasrec, serve, train  # noqa: F401
from hatllm_edge.cli.common import app, fail


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hatllm-edge {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Options before any command (the app's help text is common.HELP)."""


def main() -> None:
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
    except Exception as e:  # outside run() (printing a result, an option's callback): still one line
        if os.environ.get("HATLLM_DEBUG"):
            raise
        raise SystemExit(fail(e).exit_code) from None
