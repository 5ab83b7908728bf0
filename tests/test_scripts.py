"""The measurement scripts behind results/ still import against the package: a renamed or
moved function breaks the command a results file names, and nothing else would notice."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "scripts").glob("*.py"))


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_a_script_imports_and_has_a_main(path: Path) -> None:
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # runs its imports, not its work (that waits for main)
    assert callable(getattr(module, "main", None)), f"{path.name}: no main(); its work would run on import"
