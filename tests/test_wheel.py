"""The package as a user installs it (the ``site`` fixture: a wheel built from this checkout,
installed without ``-e`` into a folder of its own), run from outside the checkout. It must carry every
subpackage, the shipped model and the example requests, and put nothing but ``hatllm_edge``
into site-packages."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_installed

ROOT = Path(__file__).resolve().parent.parent

import hatllm_edge


def test_the_wheel_installs_one_package_with_its_data(site: Path) -> None:
    assert {p.name for p in site.iterdir()} == {"hatllm_edge", f"hatllm_edge-{hatllm_edge.__version__}.dist-info", "bin"}, \
        "nothing generic (cli, export, models) at the top of site-packages"
    checkout = {p.parent.relative_to(ROOT / "hatllm_edge").as_posix() for p in (ROOT / "hatllm_edge").rglob("__init__.py")}
    checkout |= {("export/" + p.parent.relative_to(ROOT / "export").as_posix()).removesuffix("/.")
                 for p in (ROOT / "export").rglob("__init__.py")}
    installed = {p.parent.relative_to(site / "hatllm_edge").as_posix() for p in (site / "hatllm_edge").rglob("__init__.py")}
    assert checkout - installed == set(), "every subpackage of the checkout ships (pyproject's package list)"
    model = site / "hatllm_edge" / "models" / "hatllm-gemma3-ml100k"
    for name in ("hatllm.json", "catalog.jsonl", "tokenizer.json", "adapter/adapter_model.safetensors", "sasrec.onnx"):
        assert (model / name).is_file(), name
    assert (site / "hatllm_edge" / "examples" / "user.json").is_file()
    for research in ("causal-ml100k", "hatllm-ml100k"):
        assert not (site / "hatllm_edge" / "models" / research).exists(), "research checkpoints stay in the repository"


def test_the_installed_command_line_runs_outside_the_checkout(site: Path, tmp_path: Path) -> None:
    version = run_installed(site, ["--version"], tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f"hatllm-edge {hatllm_edge.__version__}", version.stderr
    helped = run_installed(site, ["bench", "--help"], tmp_path)
    assert helped.returncode == 0 and "--startup" in helped.stdout, helped.stderr
    where = run_installed(site, [], tmp_path, code=(
        "import json, hatllm_edge, hatllm_edge.export; from hatllm_edge.app.models import default_checkpoint; "
        "print(json.dumps([hatllm_edge.__file__, hatllm_edge.export.__file__, str(default_checkpoint())]))"))
    assert where.returncode == 0, where.stderr
    assert all(p.startswith(str(site)) for p in json.loads(where.stdout)), "the wheel's copy, not the checkout"
