"""The multi-round scripts: which settings, seeds and starting model each round gets
(train_rounds.py), and which evaluations an arm's folder gets (evaluate_arm.py). The training
and the engine are replaced by recorders: these tests are about the chaining, not the model."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SHIPPED_META = json.loads((SCRIPTS.parent / "models" / "hatllm-ml100k" / "hatllm.json").read_text())


def checkpoint(folder: Path, seed: int, examples: int, lr: float, masks: tuple[int, int] = (3, 3)) -> None:
    """What a finished round leaves: its checkpoint record (the shipped model's, with this
    round's masks and training) and its last step."""
    (folder / "last").mkdir(parents=True)
    record = {**SHIPPED_META, "schedule": {"num_layers": 30, "n_in": masks[0], "n_cr": masks[1]},
              "train": {"seed": seed, "examples": examples, "lr": lr},
              "train_summary": {"best": {"step": examples // 8}, "train_s": 1.0}}
    (folder / "hatllm.json").write_text(json.dumps(record))


@pytest.fixture
def rounds(monkeypatch: pytest.MonkeyPatch) -> tuple[ModuleType, list[Any]]:
    module = load("train_rounds")
    calls: list[Any] = []

    def fake_train(cfg: Any, resume: bool = False) -> dict[str, Any]:
        calls.append(cfg)
        checkpoint(cfg.out, cfg.seed, cfg.examples, cfg.lr, (cfg.n_in, cfg.n_cr))
        return {"finished": True}

    monkeypatch.setattr(module, "train", fake_train)
    return module, calls


def run_main(module: ModuleType, monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["train_rounds.py", *args])
    module.main()


def test_the_four_rounds_chain_each_from_the_one_before(rounds: tuple[ModuleType, list[Any]], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    module, calls = rounds
    run_main(module, monkeypatch, "causal", "--seeds", "10,11,12,13", "--out", str(tmp_path / "run"))
    assert [(c.seed, c.examples, c.lr, c.eval_every) for c in calls] == [
        (10, 2400, 1e-3, 100), (11, 1920, 5e-4, 0), (12, 2400, 5e-4, 0), (13, 2400, 5e-4, 0)]
    assert [c.init_from for c in calls] == [None, *(str(tmp_path / "run" / f"r{n}") for n in (1, 2, 3))]
    assert {(c.n_in, c.n_cr, c.loss) for c in calls} == {(0, 0, "msl")}
    record = json.loads((tmp_path / "run" / "rounds.json").read_text())
    assert record["model"] == str(tmp_path / "run" / "r4") and "start" not in record
    assert [r["round"] for r in record["rounds"]] == [1, 2, 3, 4] and record["seeds"] == [10, 11, 12, 13]


def test_a_shipped_model_gets_more_rounds(rounds: tuple[ModuleType, list[Any]], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """--start 5:CHECKPOINT --rounds 6: rounds 5 and 6 repeat the fourth's settings, the fifth
    from the given model, and the record says where it started."""
    module, calls = rounds
    shipped = tmp_path / "shipped"
    checkpoint(shipped, 3, 2400, 5e-4)
    run_main(module, monkeypatch, "hatllm", "--rounds", "6", "--start", f"5:{shipped}", "--seeds", "4,5",
             "--out", str(tmp_path / "more"))
    assert [(c.seed, c.examples, c.lr, c.eval_every, c.n_in, c.n_cr) for c in calls] == [
        (4, 2400, 5e-4, 0, 3, 3), (5, 2400, 5e-4, 0, 3, 3)]
    assert [c.init_from for c in calls] == [str(shipped), str(tmp_path / "more" / "r5")]
    assert not (tmp_path / "more" / "r1").exists()
    record = json.loads((tmp_path / "more" / "rounds.json").read_text())
    assert record["start"] == {"round": 5, "from": str(shipped)} and record["model"] == str(tmp_path / "more" / "r6")
    assert [(r["round"], r["seed"]) for r in record["rounds"]] == [(5, 4), (6, 5)]
    calls.clear()  # finished rounds are skipped when the command runs again
    run_main(module, monkeypatch, "hatllm", "--rounds", "6", "--start", f"5:{shipped}", "--seeds", "4,5",
             "--out", str(tmp_path / "more"))
    assert calls == []


def test_rounds_train_on_the_given_data_files(rounds: tuple[ModuleType, list[Any]], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """--interactions/--items reach every round (a position-matched validation trains the whole
    recipe on ml-100k without each user's last item) and the record names them."""
    module, calls = rounds
    inter, items = tmp_path / "inter.tsv", tmp_path / "items.csv"
    run_main(module, monkeypatch, "hatllm", "--rounds", "2", "--seeds", "0,1", "--out", str(tmp_path / "run"),
             "--interactions", str(inter), "--items", str(items))
    assert [(c.interactions, c.items) for c in calls] == [(inter, items)] * 2
    assert json.loads((tmp_path / "run" / "rounds.json").read_text())["data"] == {"interactions": str(inter), "items": str(items)}


@pytest.mark.parametrize(("args", "message"), [
    (["--seeds", "1,2,3"], "one seed per round trained here"),
    (["--rounds", "4", "--start", "5:{ckpt}", "--seeds", "4"], "past the last round"),
    (["--rounds", "5", "--start", "5:{tmp}/nowhere", "--seeds", "4"], "not a checkpoint folder"),
    (["--rounds", "5", "--start", "five:{ckpt}", "--seeds", "4"], "expected ROUND:CHECKPOINT"),
    (["--rounds", "5", "--start", "1:{ckpt}", "--seeds", "4"], "ROUND must be 2 or more"),
    (["--rounds", "0", "--seeds", "4"], "at least 1"),
    (["--seeds", "1,2,3,4", "--interactions", "{tmp}/i.tsv"], "give both --interactions and --items"),
])
def test_bad_round_arguments_are_refused(rounds: tuple[ModuleType, list[Any]], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                         args: list[str], message: str) -> None:
    module, calls = rounds
    checkpoint(tmp_path / "ckpt", 3, 2400, 5e-4)
    args = [a.format(ckpt=tmp_path / "ckpt", tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as stop:
        run_main(module, monkeypatch, "hatllm", *args, "--out", str(tmp_path / "run"))
    assert stop.value.code == 2 and message in capsys.readouterr().err and calls == []


def test_a_round_continues_only_its_own_arm(rounds: tuple[ModuleType, list[Any]], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    module, calls = rounds
    checkpoint(tmp_path / "hatllm", 3, 2400, 5e-4, masks=(3, 3))
    with pytest.raises(SystemExit, match=r"n_in=3, n_cr=3, not the causal arm's \(0, 0\)"):
        run_main(module, monkeypatch, "causal", "--rounds", "5", "--start", f"5:{tmp_path / 'hatllm'}", "--seeds", "4",
                 "--out", str(tmp_path / "run"))
    assert calls == []


def test_evaluate_arm_runs_only_what_is_asked_and_skips_what_is_done(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    module = load("evaluate_arm")
    commands: list[tuple[str, ...]] = []

    def fake_cli(*args: str, cwd: Path) -> None:
        commands.append(args)
        if args[0] == "export":
            Path(args[2]).mkdir(parents=True)
            (Path(args[2]) / module.MANIFEST_FILE).write_text("{}")
        else:  # evaluate --out makes its folder
            out = Path(args[args.index("--out") + 1])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("{}")

    monkeypatch.setattr(module, "cli", fake_cli)
    checkpoint(tmp_path / "r5", 4, 2400, 5e-4)
    argv = ["evaluate_arm.py", str(tmp_path / "r5"), "--name", "hatllm_s0_r5", "--only", "valid/llm",
            "--bundles", str(tmp_path / "bundles"), "--results", str(tmp_path / "results")]
    monkeypatch.setattr(sys, "argv", argv)
    module.main()
    assert [c[0] for c in commands] == ["export", "evaluate"]
    evaluate = commands[1]
    assert evaluate[evaluate.index("--split") + 1] == "valid" and "--no-assist" in evaluate
    assert (tmp_path / "results" / "eval_hatllm_s0_r5_llm_valid.json").is_file()
    commands.clear()
    module.main()  # done already: nothing runs
    assert commands == []
    monkeypatch.setattr(sys, "argv", [*argv[:5], "valid/llm,test/nope"])
    with pytest.raises(SystemExit) as stop:
        module.main()
    assert stop.value.code == 2
    monkeypatch.setattr(sys, "argv", [*argv, "--spec", str(tmp_path / "spec.json")])
    with pytest.raises(SystemExit) as stop:  # a seed in the comparison needs all five
        module.main()
    assert stop.value.code == 2


def test_a_continued_model_is_not_entered_as_a_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A --start folder holds round 5 alone: it is no seed of the comparison, whose seeds are
    four rounds from one folder."""
    module = load("evaluate_arm")
    monkeypatch.setattr(module, "cli", lambda *a, **k: pytest.fail("refused only after evaluating"))
    run = tmp_path / "shipped"
    checkpoint(run / "r5", 4, 2400, 5e-4)
    (run / "rounds.json").write_text(json.dumps({"arm": "hatllm", "seeds": [4], "model": str(run / "r5"),
                                                 "start": {"round": 5, "from": "models/hatllm-ml100k"},
                                                 "rounds": [{"round": 5, "seed": 4}]}))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"arms": {"hatllm": {"seeds": []}}}))
    monkeypatch.setattr(sys, "argv", ["evaluate_arm.py", str(run), "--name", "x", "--spec", str(spec),
                                      "--bundles", str(tmp_path / "bundles"), "--results", str(tmp_path / "results")])
    with pytest.raises(SystemExit, match="rounds 5\\+ on a model trained elsewhere"):
        module.main()
    assert json.loads(spec.read_text()) == {"arms": {"hatllm": {"seeds": []}}}
