"""The package's folders are its layers: each imports only the layers below it, and the
engine's layers (core, engine, ranking) never import torch or the training stack. Checked on
every import statement, including those inside functions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import hatllm_edge
import hatllm_edge.export

PACKAGE = Path(hatllm_edge.__file__).parent
EXPORT = Path(hatllm_edge.export.__file__).parent
ORDER = ("core", "engine", "ranking", "training", "export", "app", "evaluation", "bench", "cli")
SAME_LEVEL = {"evaluation": {"bench"}, "bench": {"evaluation"}}  # side by side above app
TRAINING_STACK = ("torch", "transformers", "peft", "bitsandbytes", "gguf", "safetensors", "matplotlib")


def _layer_files() -> dict[str, list[Path]]:
    files = {layer: sorted((PACKAGE / layer).rglob("*.py")) for layer in ORDER if layer != "export"}
    files["export"] = sorted(EXPORT.rglob("*.py"))
    return files


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "hatllm_edge" and parts[1] in ORDER else None


@pytest.mark.parametrize("layer", ORDER)
def test_a_layer_imports_only_the_layers_below_it(layer: str) -> None:
    allowed = set(ORDER[: ORDER.index(layer) + 1]) - SAME_LEVEL.get(layer, set())
    wrong = [f"{path.relative_to(PACKAGE.parent)}: {name}" for path in _layer_files()[layer] for name in _imports(path)
             if (_layer_of(name) or layer) not in allowed]
    assert not wrong, f"{layer} imports a layer above it:\n" + "\n".join(wrong)


@pytest.mark.parametrize("layer", ("core", "engine", "ranking"))
def test_the_engine_layers_never_import_the_training_stack(layer: str) -> None:
    wrong = [f"{path.relative_to(PACKAGE.parent)}: {name}" for path in _layer_files()[layer] for name in _imports(path)
             if name.split(".")[0] in TRAINING_STACK]
    assert not wrong, "\n".join(wrong)


def test_ranking_a_bundle_loads_no_torch() -> None:
    code = ("import sys; import hatllm_edge.app.rank, hatllm_edge.app.serving, hatllm_edge.cli; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in %r); print(bad); sys.exit(bool(bad))" % (TRAINING_STACK,))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
