"""The examples a user starts from: the request files rank against the shipped catalog, and the
own-data example is valid data whose walk-through runs (the run itself on request: -m slow)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hatllm_edge.app.request import read_request
from hatllm_edge.core.data import Catalog, load_dataset
from hatllm_edge.ranking.resolve import Resolver

ROOT = Path(__file__).resolve().parent.parent
OWN = ROOT / "examples" / "own-data"


@pytest.mark.parametrize("name", ["user.json", "user_candidates.json"])
def test_the_example_requests_resolve_against_the_shipped_catalog(name: str) -> None:
    req = read_request(ROOT / "examples" / name)
    resolver = Resolver(Catalog.from_jsonl(ROOT / "models" / "hatllm-ml100k" / "catalog.jsonl"))
    resolver.resolve(req.history, "history")
    if req.candidates:
        resolver.resolve(req.candidates, "candidates")


def test_the_own_data_example_is_valid_data_for_every_step() -> None:
    data = load_dataset("own", OWN / "interactions.csv", OWN / "items.csv")
    assert len(data.catalog) == 40 and len(data.sequences) == 60
    assert all(len(seq) >= 8 for seq in data.sequences.values()), "every reader has validation, test and training items"
    asked = re.search(r"echo '(\{.*\})'", (OWN / "run.sh").read_text()).group(1)
    Resolver(data.catalog).resolve(json.loads(asked)["history"], "history")


@pytest.mark.slow
def test_the_own_data_walk_through_runs(tmp_path: Path) -> None:
    """examples/own-data/run.sh end to end (train, SASRec, fuse, export, evaluate, rank): minutes."""
    env = dict(os.environ, HATLLM_CACHE=str(tmp_path / "cache"))
    done = subprocess.run(["bash", str(OWN / "run.sh"), str(tmp_path / "run")], capture_output=True, text=True, env=env,
                          timeout=3600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rank" in done.stdout and (tmp_path / "run" / "bundle" / "bundle.json").is_file()
    result = json.loads((tmp_path / "run" / "test.json").read_text())
    assert result["users"] == 60 and 0 <= result["metrics"]["NDCG@10"] <= 1


@pytest.mark.slow
def test_the_quick_start_ranks_as_the_readme_shows(tmp_path: Path) -> None:
    """The README's first line: the shipped model exported on first use, then examples/user.json
    ranked over the whole catalog, history left out, fused with SASRec; the README's top 3."""
    env = dict(os.environ, HATLLM_CACHE=str(tmp_path / "cache"))
    env.pop("HATLLM_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "hatllm_edge", "rank", str(ROOT / "examples" / "user.json"), "-q"], capture_output=True,
                          text=True, env=env, timeout=1800, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    catalog = Catalog.from_jsonl(ROOT / "models" / "hatllm-ml100k" / "catalog.jsonl")
    seen = {catalog.item_ids[i] for i in Resolver(catalog).resolve(read_request(ROOT / "examples" / "user.json").history, "history")}
    assert len(result["results"]) == 10 and not seen & {r["item_id"] for r in result["results"]}
    assert [r["item_id"] for r in result["results"][:3]] == ["96", "79", "176"]  # the README's quick start
