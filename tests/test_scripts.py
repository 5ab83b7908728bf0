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


def _script(name: str):
    path = next(p for p in SCRIPTS if p.stem == name)
    spec = importlib.util.spec_from_file_location(f"script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_validation_position_groups_and_the_file_without_validation(tmp_path: Path) -> None:
    from hatllm_edge.core.data import load_dataset, read_events

    items = tmp_path / "items.csv"
    items.write_text("item_id,title\n" + "".join(f"{i},Title {i}\n" for i in "abcdef"))
    # u1: the validation target b shares its second with c (a tie, kept in row order: e before a);
    # u2: its test target f shares its second with b
    inter = tmp_path / "inter.csv"
    inter.write_text("user_id,item_id,timestamp\nu1,e,1\nu1,a,1\nu1,c,2\nu1,b,2\nu1,d,3\nu2,a,1\nu2,e,2\nu2,b,3\nu2,f,3\nu3,a,1\n")
    data = load_dataset(interactions=inter, items=items)
    events = read_events(inter, data.catalog)
    assert [e[2] for e in events["u1"]] == list(data.sequences["u1"]) == ["e", "a", "c", "b", "d"]
    vp = _script("validation_position")
    assert vp.same_second(events, "valid") == {"u1": True, "u2": False}
    assert vp.same_second(events, "test") == {"u1": False, "u2": True}

    out = tmp_path / "without.tsv"
    assert vp.write_without_validation(events, out) == 2  # u3 has no validation item
    cut = load_dataset(interactions=out, items=items)
    assert cut.sequences["u1"] == ("e", "a", "c", "d")
    full = {e.user_id: e for e in data.split("test")}
    for e in cut.split("test"):
        assert e.target == full[e.user_id].target and e.history == full[e.user_id].history[:-1]
