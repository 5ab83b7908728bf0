"""End to end through the CLI on a tiny random base: train writes a self-describing
checkpoint, evaluate and popularity report metrics, bad input exits 2 with one line."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import ITEMS, SEQUENCES, run_installed
from typer.testing import CliRunner

from hatllm_edge.bench.report import machine_line
from hatllm_edge.cli import app
from hatllm_edge.core.data import load_dataset
from hatllm_edge.core.machine import cpu_flags
from hatllm_edge.core.metrics import mean_metrics
from hatllm_edge.engine.session import OnnxBackend
from hatllm_edge.training.checkpoint import load_checkpoint
from hatllm_edge.training.resume import STATE_FILE

TESTS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HATLLM_DEBUG", raising=False)


def invoke(*args: Any) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def last_json(result: Any) -> dict[str, Any]:
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_usage_error(result: Any, *needles: str) -> None:
    """Exit code 2, no traceback, and the last line of stderr is one 'error:' line naming the problem."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ")
    for needle in needles:
        assert needle in line, (needle, line)


def train_args(out: Path, base: Path | str, data_files: tuple[Path, Path], *extra: Any) -> list[Any]:
    inter, items = data_files  # the tiny base has 2 layers: 1 IN and 1 CR unless `extra` says otherwise
    return ["train", out, "--base", base, "--interactions", inter, "--items", items, "--n-in", 1, "--n-cr", 1, *extra, "--quiet"]


@pytest.fixture(scope="module")
def trained(tiny_base: Path, data_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    return out, invoke(*train_args(out, tiny_base, data_files, *TRAIN_FLAGS))


# 6 users, one window each (19 targets), 3 windows per step: 2 steps per epoch
TRAIN_FLAGS = ("--batch-size", 3, "--epochs", 2, "--max-history", 10, "--n-in", 1, "--n-cr", 1, "--save-every", 1, "--loss", "ce")


def test_data_files_read_back(data_files: tuple[Path, Path]) -> None:
    data = load_dataset(interactions=data_files[0], items=data_files[1])
    assert {u: list(s) for u, s in data.sequences.items()} == SEQUENCES
    assert data.catalog.titles == tuple(t for _, t in ITEMS)


def test_train_writes_a_checkpoint(trained: tuple[Path, Any], tiny_base: Path) -> None:
    out, result = trained
    assert result.exit_code == 0, (result.output, result.exception)
    summary = last_json(result)
    assert summary["steps_done"] == summary["steps_planned"] == 4 and summary["finished"]
    assert summary["targets_seen"] == 2 * 19 and summary["tokens_per_s"] > 0
    for name in ("hatllm.json", "tokenizer.json", "catalog.jsonl", "train_log.jsonl", "valid_log.jsonl", "train_state.pt",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    assert not (out / "adapter" / "README.md").exists()  # peft's model card, with this machine's paths
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in log)
    assert sum(r["targets"] for r in log) == 38
    meta = json.loads((out / "hatllm.json").read_text())
    assert meta["schedule"] == {"num_layers": 2, "n_in": 1, "n_cr": 1}
    assert meta["finetune"] == "lora" and meta["model_type"] == "llama"
    assert meta["prompt"] == {"template": "list", "max_history": 10, "eos_token": "<|im_end|>"}
    assert meta["data"] == {"name": "inter", "users": 6, "items": 6, "train_units": 6, "train_targets": 19}
    assert meta["validation"]["step"] == 4 and meta["validation"]["users"] == 6  # evaluated at the end, all users
    assert meta["validation"]["renormalise"] is False
    assert meta["train"]["mode"] == "window" and meta["train"]["loss"] == "ce"
    assert Path(meta["base"]["path"]) == tiny_base


def test_train_keeps_the_best_validated_step(tiny_base: Path, data_files: tuple[Path, Path], tmp_path: Path) -> None:
    """Validated every 2 steps of 4, the checkpoint holds the step with the best NDCG@10 (the
    earlier one on a tie) and says which."""
    out = tmp_path / "run"
    result = invoke(*train_args(out, tiny_base, data_files, *TRAIN_FLAGS, "--eval-every", 2))
    assert result.exit_code == 0, result.output
    evals = [json.loads(line) for line in (out / "valid_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4]
    best = max(evals, key=lambda e: (e["metrics"]["NDCG@10"], -e["step"]))
    meta = json.loads((out / "hatllm.json").read_text())
    assert meta["validation"]["step"] == best["step"] == last_json(result)["best"]["step"]
    assert meta["train_summary"]["steps_done"] == 4
    last = json.loads((out / "last" / "hatllm.json").read_text())  # the finished run's last step, beside the best
    assert last["validation"] == evals[-1] and (out / "last" / "adapter" / "adapter_model.safetensors").is_file()


def test_train_resumes_to_the_same_weights(trained: tuple[Path, Any], tiny_base: Path, data_files: tuple[Path, Path],
                                           tmp_path: Path) -> None:
    """Stopped after its first step by the time budget and resumed, a run ends with the weights
    of the run that was never stopped: model, optimiser, schedule, data order and RNG all resume."""
    from safetensors.numpy import load_file

    out = tmp_path / "run"
    first = invoke(*train_args(out, tiny_base, data_files, *TRAIN_FLAGS, "--max-minutes", 0.00001))
    assert first.exit_code == 0, first.output
    assert last_json(first)["steps_done"] == 1 and not last_json(first)["finished"]
    assert not (out / "adapter").exists()  # no checkpoint before its first validation
    again = invoke(*train_args(out, tiny_base, data_files, *TRAIN_FLAGS, "--max-minutes", 0.00001))
    assert_usage_error(again, "--resume")  # a run in progress is never overwritten
    changed = invoke(*train_args(out, tiny_base, data_files, *TRAIN_FLAGS, "--lr", 2e-3, "--resume"))
    assert_usage_error(changed, "lr")
    state = torch.load(out / "train_state.pt", weights_only=False)
    state["progress"]["peak_rss_mib"] = 1e9  # as if the stopped process had peaked there
    torch.save(state, out / "train_state.pt")
    (tmp_path / "link").symlink_to(tmp_path)  # the run reached another way is the same run
    resumed = invoke(*train_args(tmp_path / "link" / "run", tiny_base, data_files, *TRAIN_FLAGS, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert last_json(resumed)["steps_done"] == 4 and last_json(resumed)["finished"]
    assert last_json(resumed)["peak_rss_mib"] == 1e9  # the peak over every process of the run
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (trained[0] / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in reference], abs=1e-5)
    got, want = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (out, trained[0]))
    assert got.keys() == want.keys()
    for name in got:
        np.testing.assert_allclose(got[name], want[name], atol=1e-6, err_msg=name)


def test_train_with_checkpointing_ends_with_the_same_weights(trained: tuple[Path, Any], tiny_base: Path,
                                                           data_files: tuple[Path, Path], tmp_path: Path) -> None:
    """Recomputing the layers in the backward (and switching it on mid-run) changes memory, not
    what a step computes: same losses, same weights as the run that kept its activations."""
    from safetensors.numpy import load_file

    out = tmp_path / "run"
    first = invoke(*train_args(out, tiny_base, data_files, *TRAIN_FLAGS, "--max-minutes", 0.00001))
    assert first.exit_code == 0, first.output
    resumed = invoke(*train_args(out, tiny_base, data_files, *TRAIN_FLAGS, "--checkpointing", "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "hatllm.json").read_text())["train"]["checkpointing"] is True
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (trained[0] / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in reference], abs=1e-5)
    got, want = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (out, trained[0]))
    for name in got:
        np.testing.assert_allclose(got[name], want[name], atol=1e-6, err_msg=name)


def test_train_init_from_continues_a_checkpoint(trained: tuple[Path, Any], tiny_base: Path, data_files: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    """--init-from starts from another run's adapter: validated at step 0 (here the time budget
    stops it right after) it holds that run's weights and scores what that run scored on the
    same users, even with another seed; an adapter of another shape is refused."""
    from safetensors.numpy import load_file

    out = tmp_path / "again"
    result = invoke(*train_args(out, tiny_base, data_files, *TRAIN_FLAGS, "--init-from", trained[0], "--eval-every", 2,
                                "--seed", 1, "--max-minutes", 0.00001))
    assert result.exit_code == 0, result.output
    assert last_json(result)["steps_done"] == 0 and last_json(result)["best"]["step"] == 0
    got, want = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (out, trained[0]))
    assert got.keys() == want.keys()
    for name in got:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    start = json.loads((trained[0] / "hatllm.json").read_text())["validation"]
    assert last_json(result)["best"]["metrics"] == pytest.approx(start["metrics"])
    meta = json.loads((out / "hatllm.json").read_text())
    assert Path(meta["train"]["init_from"]) == trained[0].resolve() and meta["train"]["seed"] == 1
    wrong = invoke(*train_args(tmp_path / "r8", tiny_base, data_files, *TRAIN_FLAGS, "--init-from", trained[0], "--lora-r", 8))
    assert_usage_error(wrong, "lora_r")


def _perturbed_copy(src: Path, dst: Path, seed: int) -> Path:
    """``src`` with every adapter tensor replaced by seeded noise: another 'round' of it."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    path = dst / "adapter" / "adapter_model.safetensors"
    gen = torch.Generator().manual_seed(seed)
    save_file({k: 0.05 * torch.randn(v.shape, generator=gen) for k, v in load_file(str(path)).items()}, str(path))
    return dst


def test_average_is_the_mean_of_the_merged_weights(trained: tuple[Path, Any], tmp_path: Path) -> None:
    """The averaged LoRA checkpoint, merged, holds exactly the weighted mean of the merged
    weights of its inputs (not of their A and B factors), and says what it averages."""
    first = _perturbed_copy(trained[0], tmp_path / "r1", 1)
    second = _perturbed_copy(trained[0], tmp_path / "r2", 2)
    fused = json.loads((second / "hatllm.json").read_text())  # the newest round was fused with an assistant
    fused["decoding"] = {"renormalise": True, "assistant_weight": 16.0, "shortlist": 0, "chosen_on": {"split": "valid"}}
    (second / "hatllm.json").write_text(json.dumps(fused))
    result = invoke("average", tmp_path / "avg", first, second, "--weights", "1,3")
    assert result.exit_code == 0, result.output
    assert last_json(result)["weights"] == [0.25, 0.75]
    states = [load_checkpoint(f).model.lm.state_dict() for f in (first, second, tmp_path / "avg")]
    lora_touched = 0
    for name, got in states[2].items():
        want = 0.25 * states[0][name] + 0.75 * states[1][name]
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5, msg=name)
        lora_touched += int(not torch.equal(states[0][name], states[1][name]))
    assert lora_touched >= 7 * 2  # every adapted projection of both layers differs between the inputs
    meta = json.loads((tmp_path / "avg" / "hatllm.json").read_text())
    assert meta["average"]["checkpoints"] == [str(first), str(second)] and "validation" not in meta
    assert json.loads((tmp_path / "avg" / "adapter" / "adapter_config.json").read_text())["r"] == 2 * 16
    assert (meta["train"]["lora_r"], meta["train"]["lora_alpha"]) == (32, 32)  # what --init-from checks against
    # the round's fusion is not the average's (and its assistant files stayed behind): renormalisation kept, no weight
    assert meta["decoding"]["renormalise"] is True and meta["decoding"]["assistant_weight"] == 0


def test_average_refuses_what_it_cannot_average(trained: tuple[Path, Any], tmp_path: Path) -> None:
    other = _perturbed_copy(trained[0], tmp_path / "other", 3)
    meta = json.loads((other / "hatllm.json").read_text())
    meta["schedule"]["n_cr"] = 0
    (other / "hatllm.json").write_text(json.dumps(meta))
    assert_usage_error(invoke("average", tmp_path / "a", trained[0], other), "schedule")
    assert_usage_error(invoke("average", tmp_path / "b", trained[0]), "at least two")
    assert_usage_error(invoke("average", tmp_path / "c", trained[0], trained[0], "--weights", "1"), "--weights")
    assert_usage_error(invoke("average", tmp_path / "d", trained[0], trained[0], "--weights", "1,x"), "--weights")
    assert_usage_error(invoke("average", trained[0], trained[0], trained[0]), "already exists")
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_train_prompt_mode_and_msl(tiny_base: Path, data_files: tuple[Path, Path], tmp_path: Path) -> None:
    """One target per row (the comparison mode) trains on every prefix; the masked-softmax loss runs."""
    result = invoke(*train_args(tmp_path / "p", tiny_base, data_files, "--mode", "prompt", "--batch-size", 8, "--loss", "msl"))
    assert result.exit_code == 0, result.output
    summary = last_json(result)
    assert summary["targets_seen"] == 19 and summary["steps_done"] == 3
    meta = json.loads((tmp_path / "p" / "hatllm.json").read_text())
    assert meta["train"]["mode"] == "prompt" and meta["train"]["loss"] == "msl" and meta["data"]["train_units"] == 19
    assert meta["validation"]["renormalise"]  # validated with the decoding that matches the loss
    assert meta["decoding"]["renormalise"] is True  # and ranks with it, before any `fuse --write`
    instruct = invoke(*train_args(tmp_path / "i", tiny_base, data_files, "--mode", "prompt", "--template", "instruct",
                                  "--batch-size", 10))
    assert instruct.exit_code == 0, instruct.output
    assert json.loads((tmp_path / "i" / "hatllm.json").read_text())["prompt"]["template"] == "instruct"
    assert load_checkpoint(tmp_path / "i").prompts.template == "instruct"
    assert_usage_error(invoke(*train_args(tmp_path / "w", tiny_base, data_files, "--template", "instruct")), "list")
    assert_usage_error(invoke(*train_args(tmp_path / "x", tiny_base, data_files, "--template", "chat")), "--template")


def test_checkpoint_loads_with_the_adapter_merged(trained: tuple[Path, Any], tiny_base: Path) -> None:
    out, _ = trained
    loaded = load_checkpoint(out)
    assert loaded.model.schedule.kinds == ["in", "cr"]
    assert loaded.catalog.titles == tuple(t for _, t in ITEMS)
    assert loaded.prompts.max_history == 10 and loaded.prompts.eos_id == 2
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(tiny_base)
    q_tuned = loaded.model.lm.model.layers[0].self_attn.q_proj.weight
    q_base = base.model.layers[0].self_attn.q_proj.weight
    assert q_tuned.shape == q_base.shape and not torch.equal(q_tuned, q_base)  # LoRA was trained and merged
    up = loaded.model.lm.model.layers[0].mlp.up_proj.weight  # --lora-targets all (default): the MLP too
    assert not torch.equal(up, base.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(loaded.model.lm.model.layers[0].input_layernorm.weight, base.model.layers[0].input_layernorm.weight)


def test_lora_on_attention_only_leaves_the_mlp(tiny_base: Path, data_files: tuple[Path, Path], tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    result = invoke(*train_args(tmp_path / "a", tiny_base, data_files, "--lora-targets", "attention", "--batch-size", 3))
    assert result.exit_code == 0, result.output
    tuned, base = load_checkpoint(tmp_path / "a").model.lm.model.layers[0], LlamaForCausalLM.from_pretrained(tiny_base).model.layers[0]
    assert not torch.equal(tuned.self_attn.v_proj.weight, base.self_attn.v_proj.weight)
    assert torch.equal(tuned.mlp.up_proj.weight, base.mlp.up_proj.weight)


def test_evaluate(trained: tuple[Path, Any], data_files: tuple[Path, Path], tmp_path: Path) -> None:
    out, _ = trained
    res = tmp_path / "sub" / "res.json"
    result = invoke("evaluate", out, "--interactions", data_files[0], "--items", data_files[1],
                    "--split", "valid", "--quiet", "--out", res)
    assert result.exit_code == 0, (result.output, result.exception)
    summary = last_json(result)
    saved = json.loads(res.read_text())
    assert summary["users"] == saved["users"] == 6 and summary["split"] == "valid"
    assert set(summary["metrics"]) == {"HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10"}
    assert all(0 <= v <= 1 for v in summary["metrics"].values())
    assert set(saved["ranks"]) == set(SEQUENCES)
    # k = 10 beams over a 6-item catalog finds every item: every target is ranked
    assert all(isinstance(r, int) and 0 <= r < 6 for r in saved["ranks"].values())
    assert summary["metrics"]["HR@10"] == 1.0
    assert summary["metrics"] == pytest.approx(mean_metrics(list(saved["ranks"].values())))
    assert summary["schedule"] == {"num_layers": 2, "n_in": 1, "n_cr": 1}


def test_evaluate_test_split_first_users(trained: tuple[Path, Any], data_files: tuple[Path, Path]) -> None:
    out, _ = trained
    result = invoke("evaluate", out, "--interactions", data_files[0], "--items", data_files[1], "--users", 2, "--k", 3, "--quiet",
                    "--search-errors")
    assert result.exit_code == 0, (result.output, result.exception)
    summary = last_json(result)
    assert summary["users"] == 2 and summary["split"] == "test" and summary["k"] == 3
    assert "warning: --k 3: the metrics at 5, 10 read a 3-item list" in result.stderr
    assert all(0 <= v <= 1 for v in summary["metrics"].values())
    # the search check: missed targets counted, the per-user detail left to --out
    search = summary["search_errors"]
    assert search["missed_targets"] == round(2 * (1 - summary["metrics"]["HR@5"])) and "users" not in search  # a 3-item list
    assert 0 <= search["errors"] <= search["missed_targets"]
    assert search["metrics_errors_fixed"]["NDCG@10"] >= summary["metrics"]["NDCG@10"]


def test_evaluate_user_batching_and_bf16(trained: tuple[Path, Any], data_files: tuple[Path, Path], tmp_path: Path) -> None:
    """Users batched together rank exactly as one at a time; bf16 weights rank as fp32 does."""
    out, _ = trained
    data = ["--interactions", data_files[0], "--items", data_files[1], "--split", "valid", "--quiet"]
    ranks = []
    for n in (1, 4):
        res = tmp_path / f"b{n}.json"
        result = invoke("evaluate", out, *data, "--batch-users", n, "--out", res)
        assert result.exit_code == 0, (result.output, result.exception)
        ranks.append(json.loads(res.read_text())["ranks"])
    assert ranks[0] == ranks[1]
    res = tmp_path / "bf16.json"
    result = invoke("evaluate", out, *data, "--bf16", "--out", res)
    assert result.exit_code == 0, (result.output, result.exception)
    bf16 = json.loads(res.read_text())
    assert bf16["backend"] == "torch-bf16" and set(bf16["ranks"]) == set(ranks[0])
    # bf16 rounding may flip a near tie on another CPU, not the ranking: at most one user moves
    assert sum(bf16["ranks"][u] != r for u, r in ranks[0].items()) <= 1, (bf16["ranks"], ranks[0])


def test_popularity_by_hand(data_files: tuple[Path, Path], tmp_path: Path) -> None:
    """Training parts count i2 five times, the others four: the list is i2 i1 i3 i4 i5 i6, and
    the test targets (i6 i1 i2 i3 i4 i5 for u1..u6) sit at ranks 5 1 0 2 3 4."""
    res = tmp_path / "pop.json"
    result = invoke("popularity", "--interactions", data_files[0], "--items", data_files[1], "--out", res)
    assert result.exit_code == 0, (result.output, result.exception)
    saved = json.loads(res.read_text())
    assert saved["ranks"] == {"u1": 5, "u2": 1, "u3": 0, "u4": 2, "u5": 3, "u6": 4}
    ndcg5 = (1 + 1 / math.log2(3) + 1 / 2 + 1 / math.log2(5) + 1 / math.log2(6)) / 6
    assert last_json(result)["metrics"] == pytest.approx(
        {"HR@1": 1 / 6, "HR@5": 5 / 6, "HR@10": 1.0, "NDCG@5": ndcg5, "NDCG@10": ndcg5 + 1 / math.log2(7) / 6}
    )
    valid = last_json(invoke("popularity", "--split", "valid", "--interactions", data_files[0], "--items", data_files[1]))
    assert valid["split"] == "valid" and valid["users"] == 6


@pytest.mark.parametrize("histex", [False, True])
def test_popularity_ml100k_is_the_published_baseline(histex: bool, tmp_path: Path) -> None:
    """Most-popular on the built-in ml-100k reproduces the README's row rank for rank, under both
    protocols: a change to loading, the loo-full split or the history rule would move it."""
    res = tmp_path / "pop.json"
    result = invoke("popularity", *(["--exclude-history"] if histex else []), "--out", res)
    assert result.exit_code == 0, (result.output, result.exception)
    got = json.loads(res.read_text())
    published = json.loads((TESTS.parent / "results" / "ml100k" / f"eval_pop_test{'_histex' if histex else ''}.json").read_text())
    assert got["users"] == 943 and got["split"] == "test" and got["ranks"] == published["ranks"]
    assert got["metrics"] == pytest.approx(published["metrics"], abs=1e-12)


def test_repeat_targets_are_counted_and_warned(tmp_path: Path) -> None:
    """A target the user already had (data with repeat interactions) cannot be hit with the
    history left out: the result counts such targets and stderr says so; kept, nothing is said."""
    inter, items = tmp_path / "i.csv", tmp_path / "t.csv"
    inter.write_text("user_id,item_id,timestamp\nu1,i1,1\nu1,i2,2\nu1,i3,3\nu1,i1,4\nu2,i2,1\nu2,i3,2\nu2,i1,3\n")
    items.write_text("item_id,title\ni1,A\ni2,B\ni3,C\n")
    left_out = invoke("popularity", "--exclude-history", "--interactions", inter, "--items", items, "--out", tmp_path / "p.json")
    assert left_out.exit_code == 0, (left_out.output, left_out.exception)
    got = json.loads((tmp_path / "p.json").read_text())
    assert got["history"] == "excluded" and got["repeat_targets"] == 1 and got["ranks"]["u1"] is None
    assert "1 of 2 test targets were already in their user's history" in left_out.stderr
    assert "--include-history" in left_out.stderr
    kept = invoke("popularity", "--interactions", inter, "--items", items)
    assert kept.exit_code == 0 and "repeat_targets" not in last_json(kept) and "warning" not in kept.stderr


# --------------------------------------------------------------------- bad input


def test_missing_files(tiny_base: Path, data_files: tuple[Path, Path], trained: tuple[Path, Any], tmp_path: Path) -> None:
    inter, items = data_files
    assert_usage_error(invoke(*train_args(tmp_path / "o", tiny_base, (tmp_path / "nope.csv", items))), "nope.csv", "no such file")
    assert_usage_error(invoke("evaluate", trained[0], "--interactions", inter, "--items", tmp_path / "gone.csv", "--quiet"),
                       "gone.csv", "no such file")
    assert_usage_error(invoke("popularity", "--interactions", inter), "--items")
    assert_usage_error(invoke(*train_args(tmp_path / "o", tmp_path / "no-base", data_files)), "no-base", "no such folder")


def test_malformed_data_names_file_and_line(tmp_path: Path, data_files: tuple[Path, Path]) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,item_id,timestamp\nu1,i1,1\nu1,i99,2\n")
    assert_usage_error(invoke("popularity", "--interactions", bad, "--items", data_files[1]), "bad.csv:3", "i99")


def test_a_file_that_is_not_utf8_is_named(tmp_path: Path, data_files: tuple[Path, Path]) -> None:
    items = tmp_path / "items.csv"
    items.write_bytes(data_files[1].read_text().replace("Alpha", "Alpha Misérables").encode("latin-1"))
    assert_usage_error(invoke("popularity", "--interactions", data_files[0], "--items", items), "items.csv: not UTF-8 text", "iconv")


def test_an_incomplete_checkpoint_is_refused_before_loading(trained: tuple[Path, Any], data_files: tuple[Path, Path],
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy without -r leaves adapter/ behind: named, exit 2, before the base model loads."""
    import hatllm_edge.training.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "load_base", lambda *a, **k: pytest.fail("the base model loaded before the check"))
    copy = tmp_path / "copy"
    shutil.copytree(trained[0], copy, ignore=shutil.ignore_patterns("adapter", "train_state*"))
    assert_usage_error(invoke("evaluate", copy, "--interactions", data_files[0], "--items", data_files[1], "--quiet"),
                       "incomplete checkpoint, missing adapter/adapter_config.json", "cp -r")


def test_fuse_write_into_a_bundle_is_refused_before_tuning(bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hatllm_edge.evaluation.tune as tune

    monkeypatch.setattr(tune, "tune", lambda *a, **k: pytest.fail("tuned before refusing --write"))
    assert_usage_error(invoke("fuse", bundle, "--assistant", tmp_path, "--write", "--quiet"),
                       "written into a training checkpoint", "drop --write")


def test_fuse_checks_its_grid_and_assistant_before_building_the_model(trained: tuple[Path, Any], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A negative weight or a folder that is no SASRec model is refused before the model's bundle
    is built (minutes on first use) or loaded."""
    import hatllm_edge.app.rank as rank

    monkeypatch.setattr(rank, "open_ranker", lambda *a, **k: pytest.fail("opened the model before refusing"))
    assert_usage_error(invoke("fuse", trained[0], "--assistant", tmp_path, "--weights", "1,-2", "--quiet"), "weights must be >= 0")
    assert_usage_error(invoke("fuse", trained[0], "--assistant", tmp_path, "--shortlists", "0,-5", "--quiet"), "shortlist sizes")
    assert_usage_error(invoke("fuse", trained[0], "--assistant", tmp_path / "nosuch", "--quiet"), "nosuch")


@pytest.mark.parametrize("args", [["rank", "examples/user.json"], ["serve"], ["bench", "--startup"]])
def test_cuda_without_a_gpu_is_refused_before_a_bundle_is_built(args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """--device cuda on a machine without onnxruntime-gpu: one line, before the shipped model is
    exported for it (minutes)."""
    import onnxruntime as ort

    import hatllm_edge.app.rank as rank

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    monkeypatch.setattr(rank, "cached_bundle", lambda *a, **k: pytest.fail("built a bundle before refusing"))
    assert_usage_error(invoke(*args, "--device", "cuda"), "onnxruntime-gpu with a CUDA GPU is needed for --device cuda")


def test_evaluate_refuses_engine_options_on_a_checkpoint(trained: tuple[Path, Any], data_files: tuple[Path, Path],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import hatllm_edge.training.torch_backend as torch_backend

    monkeypatch.setattr(torch_backend, "checkpoint_ranker", lambda *a, **k: pytest.fail("the checkpoint loaded before the check"))
    data = ["--interactions", data_files[0], "--items", data_files[1], "--users", 1, "--quiet"]
    for flags in (["--device", "cuda"], ["--compute", "int8"]):
        assert_usage_error(invoke("evaluate", trained[0], *data, *flags), "run in PyTorch on the CPU", "export")


def test_bad_split(trained: tuple[Path, Any], data_files: tuple[Path, Path]) -> None:
    assert_usage_error(invoke("evaluate", trained[0], "--split", "train", "--quiet"), "--split")


def test_popularity_bad_split(data_files: tuple[Path, Path]) -> None:
    """--split takes valid or test only: 'train' (or any typo) is a usage error, not a silent
    scoring of the validation targets."""
    assert_usage_error(invoke("popularity", "--split", "train", "--interactions", data_files[0], "--items", data_files[1]), "split")


def test_not_a_checkpoint(tmp_path: Path, data_files: tuple[Path, Path]) -> None:
    assert_usage_error(invoke("evaluate", tmp_path, "--interactions", data_files[0], "--items", data_files[1], "--quiet"),
                       str(tmp_path), "neither an ONNX bundle")


def test_catalog_mismatch(trained: tuple[Path, Any], tmp_path: Path, data_files: tuple[Path, Path]) -> None:
    items = tmp_path / "items.csv"
    items.write_text(data_files[1].read_text() + "i7,Eta (1996)\n")
    assert_usage_error(invoke("evaluate", trained[0], "--interactions", data_files[0], "--items", items, "--quiet"),
                       "catalog differs")


def test_schedule_larger_than_the_model(tiny_base: Path, data_files: tuple[Path, Path], tmp_path: Path) -> None:
    """--n-in 2 --n-cr 1 on a 2-layer base: more masked layers than the model has is one
    'error:' line naming n_in and exit code 2, not a traceback."""
    result = invoke(*train_args(tmp_path / "o", tiny_base, data_files, "--examples", 4, "--n-in", 2, "--n-cr", 1))
    assert_usage_error(result, "n_in")


def test_popularity_out_in_a_new_folder(data_files: tuple[Path, Path], tmp_path: Path) -> None:
    """--out in a folder that does not exist yet: the folder is made (popularity, as evaluate)."""
    res = tmp_path / "new" / "pop.json"
    result = invoke("popularity", "--interactions", data_files[0], "--items", data_files[1], "--out", res)
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads(res.read_text())["users"] == 6


def test_relative_base_path_survives_a_change_of_directory(
    tiny_base: Path, data_files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint must describe itself: a --base given relative to the working
    directory is stored resolved in hatllm.json, so evaluate from anywhere else finds it."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    out = tmp_path / "ckpt"
    result = invoke(*train_args(out, os.path.relpath(tiny_base, work), data_files, "--examples", 4, "--batch-size", 4))
    assert result.exit_code == 0, (result.output, result.exception)
    stored = Path(json.loads((out / "hatllm.json").read_text())["base"]["path"])
    assert stored.is_absolute() and stored.resolve() == tiny_base.resolve()
    monkeypatch.chdir(tmp_path)
    result = invoke("evaluate", out, "--interactions", data_files[0], "--items", data_files[1], "--users", 1, "--quiet")
    assert result.exit_code == 0, (result.output, result.exception)


def test_full_finetune_keeps_an_untied_lm_head(tiny_base: Path, data_files: tuple[Path, Path], tmp_path: Path) -> None:
    """--full: the tiny base has an untied lm_head (LlamaConfig's default), which training
    updates; the checkpoint must give back the trained head, not the base's."""
    out = tmp_path / "full"
    result = invoke(*train_args(out, tiny_base, data_files, "--full", "--batch-size", 3, "--lr", 1e-2))
    assert result.exit_code == 0, (result.output, result.exception)
    assert (out / "model.safetensors").is_file()
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(tiny_base)
    loaded = load_checkpoint(out).model.lm
    assert not base.config.tie_word_embeddings
    assert not torch.equal(loaded.model.embed_tokens.weight, base.model.embed_tokens.weight)  # trained
    assert not torch.equal(loaded.lm_head.weight, base.lm_head.weight)  # trained too: must not be the base's


@pytest.mark.slow
def test_real_model_on_ml100k(tmp_path: Path) -> None:
    """The default base (SmolLM2-135M GGUF) on MovieLens-100K: a few LoRA steps, then two
    users of the validation split. Prints the figures."""
    out = tmp_path / "smol"
    result = invoke("train", out, "--examples", 8, "--batch-size", 4, "--n-in", 2, "--n-cr", 2, "--eval-users", 2, "--quiet")
    assert result.exit_code == 0, (result.output, result.exception)
    print(result.stdout)
    assert json.loads((out / "hatllm.json").read_text())["schedule"] == {"num_layers": 30, "n_in": 2, "n_cr": 2}
    result = invoke("evaluate", out, "--split", "valid", "--users", 2, "--quiet")
    assert result.exit_code == 0, (result.output, result.exception)
    summary = last_json(result)
    print(summary)
    assert summary["users"] == 2 and all(0 <= v <= 1 for v in summary["metrics"].values())


# --- export, the engine, rank ---------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(trained: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "fp32"
    result = invoke("export", trained[0], out, "--quant", "none", "--quiet")
    assert result.exit_code == 0, result.output
    return out


def test_evaluate_weight_flags_belong_to_checkpoints(trained: tuple[Path, Any], bundle: Path, data_files: tuple[Path, Path]) -> None:
    """--bf16 / --nf4 change a PyTorch checkpoint's weights; on a bundle (weights fixed at
    export) they are a usage error, and NF4 on a model whose width is not a multiple of
    bitsandbytes' block is one too."""
    data = ["--interactions", data_files[0], "--items", data_files[1], "--users", 1, "--quiet"]
    for flag in ("--bf16", "--nf4"):
        assert_usage_error(invoke("evaluate", bundle, *data, flag), "ONNX bundle", "--quant nf4")
    assert_usage_error(invoke("evaluate", trained[0], *data, "--nf4"), "divisible by its block of 64")


def write_user(path: Path, **fields: Any) -> Path:
    path.write_text(json.dumps(fields), encoding="utf-8")
    return path


def test_export_writes_a_bundle_that_does_not_touch_the_checkpoint(trained: tuple[Path, Any], bundle: Path) -> None:
    names = {p.name for p in bundle.iterdir()}
    assert {"model.onnx", "bundle.json", "manifest.json", "tokenizer.json", "catalog.jsonl"} <= names
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["export"]["layer_kinds"] == ["in", "cr"]
    assert meta["export"]["validation"]["fp32"]["max_abs_diff"] <= 1e-4
    assert not any(p.suffix == ".onnx" for p in trained[0].rglob("*"))


def test_evaluate_bundle_equals_pytorch(trained: tuple[Path, Any], bundle: Path, data_files: tuple[Path, Path], tmp_path: Path) -> None:
    inter, items = data_files
    common = ["--interactions", inter, "--items", items, "--split", "valid", "--quiet"]
    torch_run = invoke("evaluate", trained[0], *common, "--out", tmp_path / "t.json")
    onnx_run = invoke("evaluate", bundle, *common, "--threads", 1, "--out", tmp_path / "o.json")
    assert torch_run.exit_code == 0 and onnx_run.exit_code == 0, (torch_run.output, onnx_run.output)
    t, o = json.loads((tmp_path / "t.json").read_text()), json.loads((tmp_path / "o.json").read_text())
    assert o["backend"] == "onnx-none-fp32-cpu-native" and t["backend"] == "torch-fp32"
    assert o["ranks"] == t["ranks"]


def test_rank_full_catalog_on_the_engine(bundle: Path, tmp_path: Path) -> None:
    user = write_user(tmp_path / "u.json", history=["i1", "Beta (1991)"], k=4)
    result = invoke("rank", user, "--model", bundle, "--threads", 1)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    rows = out["results"]
    assert out["mode"] == "full-catalog" and len(rows) == 4 and [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert len({r["item_id"] for r in rows}) == 4
    assert all(a["score"] >= b["score"] for a, b in zip(rows, rows[1:]))
    assert out["latency_ms"] > 0


@pytest.fixture(scope="module")
def gemma_trained(hf_tokenizer: Any, data_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Gemma3 base (a local layer whose 16-slot window is shorter than the prompts, a
    global one; a tokenizer that prepends a begin token) trained like the Llama one."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    folder = tmp_path_factory.mktemp("gemma_base")
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=hf_tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                           sliding_window=16, layer_types=["sliding_attention", "full_attention"], initializer_range=0.1,
                           bos_token_id=1, eos_token_id=2, pad_token_id=2)
    Gemma3ForCausalLM(cfg).save_pretrained(folder)
    tokenizer = copy.deepcopy(hf_tokenizer)
    tokenizer.add_bos_token = True
    tokenizer.save_pretrained(folder)
    out = tmp_path_factory.mktemp("gemma") / "run"
    result = invoke(*train_args(out, folder, data_files, *TRAIN_FLAGS))
    assert result.exit_code == 0, (result.output, result.exception)
    return out


def test_a_gemma3_base_trains_exports_and_ranks_like_pytorch(gemma_trained: Path, data_files: tuple[Path, Path],
                                                             tmp_path: Path) -> None:
    meta = json.loads((gemma_trained / "hatllm.json").read_text())
    assert meta["model_type"] == "gemma3_text" and meta["prompt"]["bos_token"] == "<|im_start|>"
    bundle = tmp_path / "fp32"
    result = invoke("export", gemma_trained, bundle, "--quant", "none", "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads((bundle / "bundle.json").read_text())["export"]["validation"]["fp32"]["max_abs_diff"] <= 1e-4
    inter, items = data_files
    common = ["--interactions", inter, "--items", items, "--split", "valid", "--quiet"]
    torch_run = invoke("evaluate", gemma_trained, *common, "--out", tmp_path / "t.json")
    onnx_run = invoke("evaluate", bundle, *common, "--threads", 1, "--out", tmp_path / "o.json")
    assert torch_run.exit_code == 0 and onnx_run.exit_code == 0, (torch_run.output, onnx_run.output)
    assert json.loads((tmp_path / "o.json").read_text())["ranks"] == json.loads((tmp_path / "t.json").read_text())["ranks"]
    user = write_user(tmp_path / "u.json", history=["i1", "Beta (1991)"], k=3)
    default = tmp_path / "default"
    assert invoke("export", gemma_trained, default, "--quiet").exit_code == 0
    assert json.loads((default / "bundle.json").read_text())["export"]["quant"] == "int8"  # Gemma 3's default weights,
    assert OnnxBackend.from_bundle(default, threads=1).compute == "int8-block"  # and block-wise int8 activations
    refused = invoke("export", gemma_trained, tmp_path / "refused", "--int4-block", 32, "--quiet")
    assert refused.exit_code == 2 and "apply to int4 weights" in refused.output and "int8" in refused.output
    assert not (tmp_path / "refused").exists()  # int4 settings are refused for int8 weights, not dropped
    assert invoke("export", gemma_trained, tmp_path / "int4", "--quant", "int4", "--int4-block", 32, "--int4-8bit", "none",
                  "--quiet").exit_code == 0
    int4 = json.loads((tmp_path / "int4" / "bundle.json").read_text())["export"]["int4"]
    assert (int4["block_size"], int4["eight_bit"], int4["algo"]) == (32, [], "rtn")  # given settings reach the quantiser
    for model, compute in ((bundle, "auto"), (default, "auto"), (tmp_path / "int4", "int8")):
        result = invoke("rank", user, "--model", model, "--threads", 1, "--compute", compute)
        assert result.exit_code == 0, result.output
        assert len(json.loads(result.stdout)["results"]) == 3


def test_rank_candidates_and_table(bundle: Path, trained: tuple[Path, Any], tmp_path: Path) -> None:
    user = write_user(tmp_path / "u.json", history=["i1", "i2"], candidates=["i6", "Delta (1993)", "i3"])
    onnx = json.loads(invoke("rank", user, "--model", bundle, "--threads", 1).stdout)
    torch_out = json.loads(invoke("rank", user, "--model", trained[0], "--backend", "torch").stdout)
    assert onnx["mode"] == "candidates"
    assert sorted(r["item_id"] for r in onnx["results"]) == ["i3", "i4", "i6"]
    assert [r["item_id"] for r in onnx["results"]] == [r["item_id"] for r in torch_out["results"]]
    for a, b in zip(onnx["results"], torch_out["results"]):
        assert a["score"] == pytest.approx(b["score"], abs=1e-3)
    table = invoke("rank", user, "--model", bundle, "--table", "--threads", 1)
    assert table.exit_code == 0 and "Delta (1993)" in table.stdout and "candidates" in table.stdout


def test_rank_builds_the_bundle_once_from_a_checkpoint(
    trained: tuple[Path, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HATLLM_CACHE", str(tmp_path / "cache"))
    user = write_user(tmp_path / "u.json", history=["i1"], k=2)
    first = invoke("rank", user, "--model", trained[0], "--quant", "int4", "--quiet", "--threads", 1)
    assert first.exit_code == 0, first.output
    built = list((tmp_path / "cache").glob("*/onnx-int4/bundle.json"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert invoke("rank", user, "--model", trained[0], "--quant", "int4", "--quiet", "--threads", 1).exit_code == 0
    assert built[0].stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"history": []}, "'history' must be a non-empty list"),
        ({"history": ["i1", "nope"]}, "history[1]: 'nope' is neither an item id nor an exact title"),
        ({"history": ["i1"], "candidates": ["i2", 3.5]}, "candidates[1]"),
        ({"history": ["i1"], "k": 0}, "field 'k' is 0; it must be from 1 to 100"),
        ({"history": ["i1"], "extra": 1}, "unknown field"),
    ],
)
def test_rank_bad_requests(bundle: Path, tmp_path: Path, fields: dict[str, Any], needle: str) -> None:
    user = write_user(tmp_path / "u.json", **fields)
    assert_usage_error(invoke("rank", user, "--model", bundle), needle)


def test_rank_bad_json_missing_file_and_cuda(bundle: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"history": [1,', encoding="utf-8")
    assert_usage_error(invoke("rank", bad, "--model", bundle), "bad.json:1", "not valid JSON")
    assert_usage_error(invoke("rank", tmp_path / "none.json", "--model", bundle), "no such file")
    user = write_user(tmp_path / "u.json", history=["i1"])
    assert_usage_error(invoke("rank", user, "--model", tmp_path), "neither an ONNX bundle")
    assert_usage_error(invoke("rank", user, "--model", bundle, "--device", "tpu"), "--device")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert_usage_error(invoke("rank", user, "--model", bundle, "--device", "cuda"), "onnxruntime-gpu")


def test_fidelity_of_an_fp32_bundle_is_perfect(trained: tuple[Path, Any], bundle: Path, data_files: tuple[Path, Path]) -> None:
    inter, items = data_files
    result = invoke("fidelity", trained[0], bundle, "--users", 3, "--candidates", 5, "--split", "valid",
                    "--interactions", inter, "--items", items, "--threads", 1, "--quiet")
    assert result.exit_code == 0, result.output
    out = last_json(result)
    assert out["users"] == 3 and out["candidates"] == 5
    assert out["kendall_tau_mean"] == pytest.approx(1.0) and out["top1_agreement"] == 1.0
    assert out["renormalise"] is False


def test_fidelity_scores_both_models_with_the_reference_decoding(trained: tuple[Path, Any], bundle: Path,
                                                                 data_files: tuple[Path, Path], tmp_path: Path) -> None:
    """A reference that decodes with renormalised steps against a bundle exported before that
    choice was stored: both are scored renormalised, so the fp32 bundle still agrees exactly."""
    reference = tmp_path / "renormalised"
    shutil.copytree(trained[0], reference)
    meta = json.loads((reference / "hatllm.json").read_text())
    meta["decoding"] = {"renormalise": True, "assistant_weight": 0.0}
    (reference / "hatllm.json").write_text(json.dumps(meta))
    inter, items = data_files
    args = ("--users", 3, "--candidates", 5, "--split", "valid", "--interactions", inter, "--items", items, "--threads", 1, "--quiet")
    out = last_json(invoke("fidelity", reference, bundle, *args))
    assert out["renormalise"] is True and out["kendall_tau_mean"] == pytest.approx(1.0)
    assert last_json(invoke("fidelity", reference, bundle, *args, "--no-renormalise"))["renormalise"] is False


def test_rank_leaves_the_history_out_by_default(bundle: Path, tmp_path: Path) -> None:
    """A seen item is never the answer a product wants (MovieLens has no repeated pair): rank
    leaves the history out unless --include-history (the loo-full protocol) says otherwise, and
    says which in its output."""
    user = write_user(tmp_path / "u.json", history=["i1", "i2"], k=3)
    out = json.loads(invoke("rank", user, "--model", bundle, "--threads", 1).stdout)
    assert len(out["results"]) == 3 and not {"i1", "i2"} & {r["item_id"] for r in out["results"]}
    assert out["history"] == "excluded"
    kept = json.loads(invoke("rank", user, "--model", bundle, "--include-history", "--k", 6, "--threads", 1).stdout)
    assert kept["history"] == "included" and {"i1", "i2"} <= {r["item_id"] for r in kept["results"]}
    cands = write_user(tmp_path / "c.json", history=["i1"], candidates=["i1", "i3", "i4"])
    rows = json.loads(invoke("rank", cands, "--model", bundle, "--threads", 1).stdout)["results"]
    assert sorted(r["item_id"] for r in rows) == ["i3", "i4"]
    rows = json.loads(invoke("rank", cands, "--model", bundle, "--include-history", "--threads", 1).stdout)["results"]
    assert sorted(r["item_id"] for r in rows) == ["i1", "i3", "i4"]


def test_bench_runs_every_backend_on_the_same_workloads(trained: tuple[Path, Any], data_files: tuple[Path, Path],
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hatllm_edge.bench import workloads

    monkeypatch.setenv("HATLLM_CACHE", str(tmp_path / "cache"))
    # the tiny data set's stand-ins for the target workloads, so the paired check runs too
    monkeypatch.setattr(workloads, "CAND_TARGET", "cand4-h3-b2")
    monkeypatch.setattr(workloads, "TOPK_TARGET", "top3-h3-b1")
    inter, items = data_files
    backends = "torch-fp32,torch-bf16,ort-fp32,ort-int4,ort-int4-native"
    result = invoke("bench", "--model", trained[0], "--interactions", inter, "--items", items, "--backends", backends,
                    "--workloads", "cand4-h3-b2,top3-h3-b1", "--seconds", 0, "--min-repeats", 2, "--max-repeats", 2,
                    "--threads", 1, "--out", tmp_path / "bench", "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert (tmp_path / "bench" / "bench.png").stat().st_size > 10_000
    assert [b["name"] for b in report["backends"]] == backends.split(",")
    for run in report["backends"]:
        assert run["load_s"] > 0 and run["size_mb"] > 0 and run["peak_rss_mb"] > 0
        assert [r["workload"] for r in run["results"]] == ["cand4-h3-b2", "top3-h3-b1"]
        for r in run["results"]:
            assert len(r["latencies_ms"]) == 2 and r["tokens"] > 0 and r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
    # runs per request: a batch of 2 users with candidates is one prefill and one pass on native
    # routes; the int8 route runs one batch per prompt width; a beam search a run per step
    runs = {(b["name"], r["workload"]): r["runs"] for b in report["backends"] for r in b["results"]}
    assert runs[("ort-int4-native", "cand4-h3-b2")] == runs[("torch-fp32", "cand4-h3-b2")] == 2
    assert runs[("ort-int4", "cand4-h3-b2")] >= 2 and runs[("ort-int4", "top3-h3-b1")] > 2
    assert report["config"]["threads"] == 1 and "ort-int4-native" in result.stdout
    # the machine the figures belong to, AMX included (it decides which backend leads)
    machine = report["machine"]
    assert machine["amx"] == ("amx_int8" in cpu_flags()) and machine["onnxruntime_amx"] in (machine["amx"], None)
    assert machine_line(machine) in result.stdout and ("no AMX" in result.stdout) != machine["amx"]
    # paired check: the references and the picked ORT backend, 2 turns each (max_repeats)
    paired = {run["name"]: run for run in report["paired"]}
    cand_pick = report["targets_sequential"]["candidates"]["backend"]
    assert cand_pick in ("ort-int4", "ort-int4-native") and {"torch-fp32", "torch-bf16", cand_pick} <= set(paired)
    for run in paired.values():
        for r in run["results"]:
            assert len(r["latencies_ms"]) == 2 and r["p50_ms"] > 0
    assert [r["workload"] for r in paired["torch-fp32"]["results"]] == ["cand4-h3-b2", "top3-h3-b1"]
    assert report["targets"]["candidates"]["p50_ms"] == next(
        r["p50_ms"] for r in paired[report["targets"]["candidates"]["backend"]]["results"] if r["workload"] == "cand4-h3-b2")
    # ratios only: what they mean is the README's to say, not a threshold in the code
    assert {"speedup_vs_torch-fp32", "speedup_vs_torch-bf16"} <= set(report["targets"]["candidates"])
    assert not any("target_met" in part for part in report["targets"].values())
    assert set(report["targets"]["topk"]) >= {"backend", "speedup_vs_torch-fp32"} and "paired check" in result.stdout


@pytest.mark.parametrize(("args", "needle"), [
    (["--workloads", "cand4-h3"], "workload 'cand4-h3'"),
    (["--workloads", "cand4-h30-b1"], "have 30 history items"),
    (["--backends", "ort-int3"], "backend 'ort-int3'"),
    (["--threads", "0"], "--threads >= 1"),
    (["--paired", "-1"], "--paired >= 0"),
    (["--backends", "torch-nf4"], "divisible by its block of 64"),  # the tiny model's hidden size is 32
])
def test_bench_bad_options(trained: tuple[Path, Any], data_files: tuple[Path, Path], tmp_path: Path,
                           args: list[str], needle: str) -> None:
    inter, items = data_files
    result = invoke("bench", "--model", trained[0], "--interactions", inter, "--items", items, "--backends", "ort-fp32",
                    "--workloads", "cand4-h3-b1", "--out", tmp_path, "--quiet", *args)
    assert_usage_error(result, needle)


def test_bench_ablation_undoes_one_step_at_a_time(trained: tuple[Path, Any], data_files: tuple[Path, Path],
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hatllm_edge.bench.ablation import ABLATIONS

    monkeypatch.setenv("HATLLM_CACHE", str(tmp_path / "cache"))
    inter, items = data_files
    result = invoke("bench", "--ablation", "--model", trained[0], "--interactions", inter, "--items", items,
                    "--workloads", "cand5-h3-b2", "--threads", 1, "--out", tmp_path, "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "ablation.json").read_text())
    assert [r["variant"] for r in report["rows"]] == [name for name, _ in ABLATIONS]
    rows = report["rows"]
    assert rows[0]["vs_shipped"] == 1.0 and len(rows[0]["latencies_ms"]) == 5 * (len(ABLATIONS) - 1)
    assert all(len(r["latencies_ms"]) == len(r["shipped_latencies_ms"]) == 5 for r in rows[1:])  # turn by turn
    by_name = {r["variant"]: r for r in report["rows"]}
    for name in ("graph optimisations: none", "1 thread", "one row per candidate (prompt cache copied per candidate)",
                 "all candidates in one packed row", "full logits back to NumPy, log-softmax there"):
        # layout and plumbing change no score in exact arithmetic (tests/test_ranking.py checks that
        # under float compute); under the shipped int8 compute another layout rounds its attention
        # differently, which may move an int8 code (0.0037 seen on an Intel CPU), so a loose bound
        assert by_name[name]["max_score_diff"] <= 0.05, name
    assert by_name["fp32 bundle"]["max_score_diff"] > 0  # arithmetic does
    assert "one row per candidate" in result.stdout
    picked = invoke("bench", "--ablation", "--variants", "own length", "--model", trained[0], "--interactions", inter,
                    "--items", items, "--workloads", "cand5-h3-b2", "--threads", 1, "--out", tmp_path / "one", "--quiet")
    assert picked.exit_code == 0, picked.output
    assert [r["variant"] for r in json.loads((tmp_path / "one" / "ablation.json").read_text())["rows"]] == [
        "shipped engine", "prompts padded to their own length, not a multiple of 16"]
    assert_usage_error(invoke("bench", "--ablation", "--variants", "nothing like it", "--model", trained[0], "--interactions",
                              inter, "--items", items, "--workloads", "cand5-h3-b2", "--out", tmp_path / "none", "--quiet"),
                       "no ablation variant")


# --------------------------------------------------------------------------- sasrec


def sasrec_train_args(out: Path, data_files: tuple[Path, Path]) -> list[Any]:
    inter, items = data_files
    return ["sasrec", "train", out, "--interactions", inter, "--items", items, "--max-len", 8, "--hidden", 16, "--heads", 2,
            "--blocks", 1, "--stride", 8, "--batch-size", 4, "--warmup-steps", 2, "--max-epochs", 2, "--threads", 1, "--quiet"]


def sasrec_valid_at_chosen_epoch(out: Path) -> dict[str, float]:
    from hatllm_edge.ranking.assistant import read_config

    return read_config(out)["training"]["valid_at_chosen_epoch"]


@pytest.fixture(scope="module")
def sasrec_trained(data_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("sasrec") / "run"
    return out, invoke(*sasrec_train_args(out, data_files))


def test_sasrec_train_writes_a_checkpoint(sasrec_trained: tuple[Path, Any], data_files: tuple[Path, Path]) -> None:
    from hatllm_edge.training import sasrec

    out, result = sasrec_trained
    assert result.exit_code == 0, (result.output, result.exception)
    summary = last_json(result)
    assert summary["epochs"] == 2 and summary["chosen_epoch"] in (1, 2) and summary["torch_threads"] == 1
    assert summary["wall_s"] >= 0
    for name in (sasrec.CONFIG_FILE, sasrec.WEIGHTS_FILE, STATE_FILE, sasrec.LOG_FILE):
        assert (out / name).is_file(), name
    meta = sasrec.read_config(out)
    assert meta["model"] == {"num_items": 6, "max_len": 8, "hidden": 16, "heads": 2, "blocks": 1, "dropout": 0.2}
    assert meta["training"] == summary
    # the command as given: the options set on the command line, in declaration order
    inter, items = data_files
    assert meta["command"] == (f"hatllm-edge sasrec train {out} --interactions {inter} --items {items} --max-len 8 --hidden 16 "
                               "--heads 2 --blocks 1 --stride 8 --batch-size 4 --warmup-steps 2 --max-epochs 2 --threads 1 --quiet")


def test_train_defaults_are_the_library_defaults_and_the_shipped_recipe() -> None:
    import typer.main

    from hatllm_edge.training.config import TrainConfig

    cmd = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    defaults = TrainConfig(out=Path(".")).to_dict()
    options = {p.name: p.default for p in cmd.params if p.name in defaults and p.name not in ("out", "base")}
    assert options.pop("examples") == 0 and defaults["examples"] is None  # 0 on the command line: every window
    assert options == {f: defaults[f] for f in options}
    assert len(options) >= 25 and defaults["loss"] == "msl" and defaults["lr"] == 1e-3
    assert (defaults["n_in"], defaults["n_cr"]) == (3, 3)  # the shipped schedule


def test_sasrec_train_defaults_are_the_library_defaults() -> None:
    import typer.main

    from hatllm_edge.training.sasrec import TrainConfig

    cmd = typer.main.get_command(app).commands["sasrec"].commands["train"]  # type: ignore[attr-defined]
    defaults = TrainConfig(out=Path("."))
    options = {p.name: p.default for p in cmd.params if p.name not in ("out", "resume", "quiet", "help")}
    assert options == {f: getattr(defaults, f) for f in options} and set(options) == set(defaults.to_json()) - {"out"}


def test_sasrec_evaluate_export_and_onnx(sasrec_trained: tuple[Path, Any], data_files: tuple[Path, Path], tmp_path: Path) -> None:
    out, _ = sasrec_trained
    inter, items = data_files
    res = tmp_path / "sub" / "valid.json"
    valid = invoke("sasrec", "evaluate", out, "--split", "valid", "--interactions", inter, "--items", items, "--out", res)
    assert valid.exit_code == 0, (valid.output, valid.exception)
    summary, saved = last_json(valid), json.loads(res.read_text())
    assert summary["split"] == saved["split"] == "valid" and summary["users"] == saved["users"] == 6
    assert summary["metrics"] == saved["metrics"] == pytest.approx(mean_metrics(list(saved["ranks"].values())))
    assert set(saved["ranks"]) == set(SEQUENCES) and all(0 <= r < 6 for r in saved["ranks"].values())
    assert summary["metrics"] == sasrec_valid_at_chosen_epoch(out), "the saved weights are the chosen epoch's"
    assert saved["command"].startswith(f"hatllm-edge sasrec evaluate {out} --split valid ")

    exported = invoke("sasrec", "export", out, "--out", tmp_path / "g" / "m.onnx", "--opset", 17)
    assert exported.exit_code == 0, (exported.output, exported.exception)
    report = last_json(exported)
    assert report["onnx"] == str(tmp_path / "g" / "m.onnx") and report["opset"] == 17 and report["num_items"] == 6
    assert report["max_abs_diff"] < 1e-4 and (tmp_path / "g" / "m.onnx").is_file()

    runs = {}
    for backend in ("torch", "onnx"):
        r = invoke("sasrec", "evaluate", out, "--backend", backend, "--onnx", tmp_path / "g" / "m.onnx", "--threads", 1,
                   "--interactions", inter, "--items", items, "--out", tmp_path / f"{backend}.json")
        assert r.exit_code == 0, (backend, r.output, r.exception)
        assert last_json(r)["backend"] == backend and last_json(r)["split"] == "test"
        runs[backend] = json.loads((tmp_path / f"{backend}.json").read_text())["ranks"]
    assert runs["onnx"] == runs["torch"]
    left_out = invoke("sasrec", "evaluate", out, "--exclude-history", "--interactions", inter, "--items", items)
    assert left_out.exit_code == 0 and last_json(left_out)["history"] == "excluded" and last_json(left_out)["repeat_targets"] == 0


def test_sasrec_report_writes_the_results_files(sasrec_trained: tuple[Path, Any], data_files: tuple[Path, Path], tmp_path: Path) -> None:
    out, _ = sasrec_trained
    inter, items = data_files
    dest = tmp_path / "results" / "toy.json"
    result = invoke("sasrec", "report", out, "--out", dest, "--threads", 1, "--interactions", inter, "--items", items)
    assert result.exit_code == 0, (result.output, result.exception)
    summary = last_json(result)
    assert "ranks" not in summary and summary["split"] == "test" and summary["valid_metrics"] == sasrec_valid_at_chosen_epoch(out)
    assert summary["onnx"]["test_same_rank_users"] == summary["onnx"]["test_users"] == 6
    saved = json.loads(dest.read_text())
    assert saved["command"].startswith(f"hatllm-edge sasrec report {out} --out {dest}")
    assert saved["train_command"].startswith("hatllm-edge sasrec train ")
    assert json.loads((tmp_path / "results" / "toy_valid.json").read_text())["split"] == "valid"
    assert (tmp_path / "results" / "toy_train_log.jsonl").read_text() == (out / "train_log.jsonl").read_text()
    assert (tmp_path / "results" / "toy_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # compare reads it like any evaluation JSON, and writes what it printed with its command
    compared = tmp_path / "results" / "compare.json"
    assert invoke("compare", dest, dest, "--samples", 50, "--out", compared).exit_code == 0
    record = json.loads(compared.read_text())
    assert record["command"] == f"hatllm-edge compare {dest} {dest} --samples 50 --out {compared}"
    assert record["bootstrap"]["toy"]["NDCG@10"]["diff"] == 0.0 and "NDCG@10" in record["table"]


@pytest.mark.parametrize(("args", "needle"), [
    (["evaluate", "{ckpt}", "--split", "nope"], "Invalid value for '--split': 'nope' is not one of 'valid', 'test'"),
    (["evaluate", "{ckpt}", "--backend", "tflite"], "Invalid value for '--backend'"),
    (["evaluate", "{missing}"], "not a SASRec checkpoint"),
    (["evaluate", "{ckpt}", "--backend", "onnx", "--onnx", "{missing}/m.onnx"], "no ONNX file"),
    (["evaluate", "{ckpt}", "--threads", "0"], "Invalid value for '--threads'"),
    (["export", "{missing}"], "not a SASRec checkpoint"),
    (["report", "{missing}", "--out", "{missing}/r.json"], "not a SASRec checkpoint"),
    (["train", "{new}", "--schedule", "linear"], "Invalid value for '--schedule'"),
    (["train", "{new}", "--batch-size", "0"], "batch_size is 0"),
    (["train", "{new}", "--stride", "80"], "stride 80 is over max_len 50"),
    (["train", "{new}", "--hidden", "10", "--heads", "3"], "not a multiple of heads"),
    (["train", "{new}", "--resume"], "nothing to resume"),
])
def test_sasrec_bad_input(sasrec_trained: tuple[Path, Any], data_files: tuple[Path, Path], tmp_path: Path,
                          args: list[str], needle: str) -> None:
    args = [a.format(ckpt=sasrec_trained[0], missing=tmp_path / "missing", new=tmp_path / "new") for a in args]
    data = [] if args[0] == "export" else ["--interactions", data_files[0], "--items", data_files[1]]
    assert_usage_error(invoke("sasrec", *args, *data), needle)
    assert not (tmp_path / "missing").exists()


# --------------------------------------------------------------------------- fusion with the assistant


def test_fuse_writes_the_decoding_and_the_assistant_travels_into_the_bundle(
    trained: tuple[Path, Any], sasrec_trained: tuple[Path, Any], data_files: tuple[Path, Path], tmp_path: Path
) -> None:
    """fuse tunes on validation and stores its choice in the checkpoint; rank then fuses by
    default (and not with --no-assist or "assist": false); a bundle exported from the
    checkpoint carries the assistant in its manifest and ranks as PyTorch does."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained[0], ckpt)
    sasrec_dir, _ = sasrec_trained
    assert invoke("sasrec", "export", sasrec_dir).exit_code == 0
    grid = tmp_path / "fuse.json"
    data = ["--interactions", data_files[0], "--items", data_files[1]]
    result = invoke("fuse", ckpt, "--assistant", sasrec_dir, "--weights", "0,1", "--renormalise", "both", "--users", 0,
                    "--backend", "torch", "--out", grid, "--quiet", *data)
    assert result.exit_code == 0, (result.output, result.exception)
    saved = json.loads(grid.read_text())
    assert [(r["renormalise"], r["assistant_weight"]) for r in saved["grid"]] == [(False, 0), (False, 1), (True, 0), (True, 1)]
    assert saved["users"] == 6 and not (ckpt / "sasrec.onnx").exists()  # no --write: the checkpoint is untouched
    # no decoding written yet: an assistant or a shortlist that would not be fused is refused, not ignored
    assert_usage_error(invoke("evaluate", ckpt, "--assistant", sasrec_dir, "--quiet", *data), "no fusion weight of its own",
                       "--assistant-weight")
    assert_usage_error(invoke("evaluate", ckpt, "--assistant", sasrec_dir, "--no-assist", "--quiet", *data), "drop one of them")
    assert_usage_error(invoke("evaluate", ckpt, "--shortlist", 6, "--quiet", *data), "--shortlist 6 draws the list from the assistant")
    assert invoke("fuse", ckpt, "--assistant", sasrec_dir, "--weights", "1", "--renormalise", "off", "--users", 0,
                  "--backend", "torch", "--write", "--quiet", *data).exit_code == 0
    meta = json.loads((ckpt / "hatllm.json").read_text())
    assert meta["decoding"]["assistant_weight"] == 1 and meta["decoding"]["renormalise"] is False
    assert meta["decoding"]["chosen_on"]["history"] == "included"  # the protocol the weight was chosen under
    assert (ckpt / "sasrec.onnx").is_file() and (ckpt / "sasrec.json").is_file()
    user = write_user(tmp_path / "u.json", history=["i1", "i2"], k=3)
    fused = json.loads(invoke("rank", user, "--model", ckpt, "--backend", "torch").stdout)
    alone = json.loads(invoke("rank", user, "--model", ckpt, "--backend", "torch", "--no-assist").stdout)
    off = json.loads(invoke("rank", write_user(tmp_path / "v.json", history=["i1", "i2"], k=3, assist=False),
                            "--model", ckpt, "--backend", "torch").stdout)
    assert fused["assistant_weight"] == 1 and alone["assistant_weight"] == off["assistant_weight"] == 0
    assert alone["results"] == off["results"] and [r["score"] for r in fused["results"]] != [r["score"] for r in alone["results"]]
    assert_usage_error(invoke("rank", user, "--model", ckpt, "--backend", "torch", "--shortlist", 6, "--no-assist"), "--no-assist")
    # a shortlist of the whole 6-item catalog is exact, as the 10-wide beam over it is
    r6 = invoke("rank", user, "--model", ckpt, "--backend", "torch", "--shortlist", 6)
    assert r6.exit_code == 0, (r6.output, r6.exception)
    listed = json.loads(r6.stdout)
    assert listed["shortlist"] == 6 and "beams" not in listed and "beams" in fused
    assert [r["item_id"] for r in listed["results"]] == [r["item_id"] for r in fused["results"]]
    assert [r["score"] for r in listed["results"]] == pytest.approx([r["score"] for r in fused["results"]], abs=1e-3)
    result = invoke("fuse", ckpt, "--assistant", sasrec_dir, "--weights", "0,1", "--renormalise", "off", "--shortlists", "0,6",
                    "--users", 0, "--backend", "torch", "--out", grid, "--quiet", *data)
    assert result.exit_code == 0, (result.output, result.exception)
    rows = json.loads(grid.read_text())["grid"]
    assert [(r["assistant_weight"], r["shortlist"]) for r in rows] == [(0, 0), (1, 0), (1, 6)]
    assert rows[1]["ranks"] == rows[2]["ranks"]
    assert_usage_error(invoke("fuse", ckpt, "--assistant", sasrec_dir, "--shortlists", "0,x", "--quiet"), "--shortlists")
    # a mixture: tried beside the product on the same shortlist, and evaluated alone, it ranks alike
    result = invoke("fuse", ckpt, "--assistant", sasrec_dir, "--weights", "1", "--renormalise", "on", "--shortlists", "3",
                    "--shares", "0.5", "--users", 0, "--backend", "torch", "--out", grid, "--quiet", *data)
    assert result.exit_code == 0, (result.output, result.exception)
    rows = json.loads(grid.read_text())["grid"]
    assert [(r["assistant_weight"], r["shortlist"], r["mixture"]) for r in rows] == [(1, 3, False), (0.5, 3, True)]
    mixed = tmp_path / "mixed.json"
    result = invoke("evaluate", ckpt, "--split", "valid", "--mixture", "--assistant-weight", 0.5, "--shortlist", 3, "--renormalise",
                    "--quiet", "--out", mixed, *data)
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads(mixed.read_text())["ranks"] == rows[1]["ranks"] and last_json(result)["decoding"]["mixture"] is True
    for args, needle in ((["--mixture", "--shortlist", 0], "--shortlist N (N > 0)"), (["--mixture", "--assistant-weight", 16], "share")):
        assert_usage_error(invoke("evaluate", ckpt, *args, "--quiet", *data), needle)
    for args, needle in ((["--shares", "1.5", "--shortlists", "3"], "between 0 and 1"), (["--shares", "0.5"], "add a size > 0")):
        assert_usage_error(invoke("fuse", ckpt, "--assistant", sasrec_dir, *args, "--quiet", *data), needle)
    mixture = tmp_path / "mixture"
    shutil.copytree(ckpt, mixture)
    meta = json.loads((mixture / "hatllm.json").read_text())
    meta["decoding"] = {"renormalise": True, "assistant_weight": 0.5, "shortlist": 3, "mixture": True}
    (mixture / "hatllm.json").write_text(json.dumps(meta))
    ranked = json.loads(invoke("rank", user, "--model", mixture, "--backend", "torch").stdout)
    assert ranked["mixture"] is True and ranked["shortlist"] == 3 and len(ranked["results"]) == 3
    from hatllm_edge.app.models import open_model

    model = open_model(mixture)  # each listed title's score is the mixture's, by hand
    history = [model.catalog.index(i) for i in ("i1", "i2")]
    listed = [model.catalog.index(r["item_id"]) for r in ranked["results"]]
    llm = model.score_batch([history], [listed], assist=False)[0].by_position()
    prior = model.assistant.logprobs([["i1", "i2"]])[0][listed]  # type: ignore[union-attr]
    assert [r["score"] for r in ranked["results"]] == pytest.approx(np.logaddexp(np.log(0.5) + prior, np.log(0.5) + llm), abs=1e-3)
    assert_usage_error(invoke("evaluate", mixture, "--product", "--quiet", *data), "pass --assistant-weight")
    assert_usage_error(invoke("evaluate", mixture, "--mixture", "--no-assist", "--quiet", *data), "drop one of them")
    assert_usage_error(invoke("rank", user, "--model", mixture, "--backend", "torch", "--shortlist", 0), "needs a shortlist")
    bundle = tmp_path / "bundle"
    assert invoke("export", ckpt, bundle, "--quant", "none", "--quiet").exit_code == 0
    manifest = json.loads((bundle / "manifest.json").read_text())["files"]
    assert {"sasrec.json", "sasrec.onnx"} <= set(manifest)
    engine = json.loads(invoke("rank", user, "--model", bundle, "--threads", 1).stdout)
    assert engine["assistant_weight"] == 1 and engine["renormalise"] is False
    assert [r["item_id"] for r in engine["results"]] == [r["item_id"] for r in fused["results"]]
    for a, b in zip(engine["results"], fused["results"]):
        assert a["score"] == pytest.approx(b["score"], abs=1e-3)
    # a model that decodes renormalised: a candidate request scores what the full-catalog beam gave
    meta["decoding"]["renormalise"] = True
    (ckpt / "hatllm.json").write_text(json.dumps(meta))
    top = json.loads(invoke("rank", user, "--model", ckpt, "--backend", "torch").stdout)
    picked = write_user(tmp_path / "p.json", history=["i1", "i2"], candidates=[r["item_id"] for r in top["results"]][::-1])
    scored = json.loads(invoke("rank", picked, "--model", ckpt, "--backend", "torch").stdout)
    assert top["renormalise"] is scored["renormalise"] is True
    assert {r["item_id"]: r["score"] for r in scored["results"]} == pytest.approx({r["item_id"]: r["score"] for r in top["results"]}, abs=1e-3)
    assert [r["score"] for r in top["results"]] != pytest.approx([r["score"] for r in fused["results"]], abs=1e-3)
    assert_usage_error(invoke("fuse", ckpt, "--assistant", sasrec_dir, "--weights", "x", "--quiet"), "--weights")
    assert_usage_error(invoke("rank", write_user(tmp_path / "w.json", history=["i1"], assist="yes"), "--model", bundle), "assist")


# --------------------------------------------------------------------------- layering and the engine-only install

BLOCKED = ("torch", "transformers", "peft", "bitsandbytes", "gguf", "matplotlib", "safetensors", "export")

NO_TRAINING_STACK = """
import sys
sys.path.insert(0, {root!r})
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is blocked: the engine must run without it")
sys.meta_path.insert(0, Block())
sys.argv = ["hatllm-edge", *{args!r}]
from hatllm_edge.cli import main
main()
"""


def run_without_training_stack(*args: Any) -> subprocess.CompletedProcess:
    root = str(Path(__file__).resolve().parent.parent)
    code = NO_TRAINING_STACK.format(root=root, blocked=BLOCKED, args=[str(a) for a in args])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_rank_on_a_bundle_runs_with_the_training_stack_blocked(bundle: Path, trained: tuple[Path, Any], tmp_path: Path) -> None:
    """The engine install (numpy, tokenizers, onnx, onnxruntime, typer, tqdm) ranks a bundle:
    torch, transformers and the exporter are never imported, -q included. A checkpoint then
    needs its bundle built, which such an install says plainly it cannot do."""
    user = write_user(tmp_path / "u.json", history=["i1", "i2"], k=3)
    result = run_without_training_stack("rank", user, "--model", bundle, "-q", "--threads", 1)
    assert result.returncode == 0, result.stderr
    assert [r["rank"] for r in json.loads(result.stdout)["results"]] == [1, 2, 3]
    cands = write_user(tmp_path / "c.json", history=["i1"], candidates=["i2", "i3"])
    result = run_without_training_stack("rank", cands, "--model", bundle, "-q", "--threads", 1, "--table")
    assert result.returncode == 0 and "candidates" in result.stdout, result.stderr
    for flags in ([], ["--backend", "torch"]):  # built into a bundle, or run in PyTorch: both need the training stack
        result = run_without_training_stack("rank", user, "--model", trained[0], "-q", *flags)
        assert result.returncode == 2 and "pip install '.[train]' in the checkout" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


WHEEL_BLOCKED = ("torch", "transformers", "peft", "bitsandbytes", "hatllm_edge.export", "hatllm_edge.training")


def test_the_installed_wheel_ranks_a_bundle_without_the_training_stack(site: Path, bundle: Path, tmp_path: Path) -> None:
    """The installed wheel (not the checkout) ranks a bundle from outside the checkout with torch,
    transformers, the exporter and the training layer blocked from importing."""
    user = tmp_path / "u.json"
    user.write_text(json.dumps({"history": ["i1", "i2"], "k": 3}))
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            f"        if any(name == b or name.startswith(b + '.') for b in {WHEEL_BLOCKED!r}):\n"
            "            raise ImportError(name + ' is blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            f"sys.argv = ['hatllm-edge', 'rank', {str(user)!r}, '--model', {str(bundle)!r}, '-q', '--threads', '1']\n"
            "from hatllm_edge.cli import main\n"
            "main()\n")
    done = run_installed(site, [], tmp_path, code=code)
    assert done.returncode == 0, done.stderr
    assert [r["rank"] for r in json.loads(done.stdout)["results"]] == [1, 2, 3]


def test_a_gpu_builds_the_fp16_bundle_by_default() -> None:
    from hatllm_edge.app.rank import bundle_dtype

    assert (bundle_dtype("cuda"), bundle_dtype("cpu"), bundle_dtype("cuda", "fp32")) == ("fp16", "fp32", "fp32")


def test_bench_startup_times_whole_rank_processes(bundle: Path, tmp_path: Path) -> None:
    result = invoke("bench", "--startup", "--model", bundle, "--min-repeats", 1, "--threads", 1, "--out", tmp_path, "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "startup.json").read_text())
    p50 = report["p50_s"]
    assert report["repeats"] == 1 and 0 < p50["python"] < p50["cli_import"] < p50["rank"] and report["engine_ms_p50"] > 0
    assert "rank process p50" in result.stdout


def test_rank_refuses_flags_that_would_do_nothing(bundle: Path, trained: tuple[Path, Any], tmp_path: Path) -> None:
    """Every rank flag applies to what runs or is refused: --quant or --dtype on a bundle (its
    weights are fixed), --cuda-graph on the CPU, --quant, --dtype, --compute or --cuda-graph with
    --backend torch (PyTorch fp32 runs)."""
    user = write_user(tmp_path / "u.json", history=["i1"], k=2)
    assert_usage_error(invoke("rank", user, "--model", bundle, "--quant", "int4"), "--quant", "bundle already")
    assert_usage_error(invoke("rank", user, "--model", bundle, "--dtype", "fp16"), "--dtype", "dtype fp32")
    assert_usage_error(invoke("rank", user, "--model", bundle, "--cuda-graph"), "CUDA graphs need --device cuda")
    for flags in (["--quant", "nf4"], ["--dtype", "fp16"]):
        assert_usage_error(invoke("rank", user, "--model", trained[0], "--backend", "torch", *flags), "--backend torch")
    for flags in (["--compute", "int8"], ["--cuda-graph"], ["--device", "cuda"]):
        assert_usage_error(invoke("rank", user, "--model", trained[0], "--backend", "torch", *flags), "run in PyTorch on the CPU")
    ok = invoke("rank", user, "--model", trained[0], "--backend", "torch", "--threads", 1)
    assert ok.exit_code == 0, ok.output


@pytest.mark.parametrize(("args", "needle"), [
    (["rank", "examples/user.json", "--bogus"], "No such option: --bogus (see '"),
    (["rank"], "Missing argument 'user'"),
    (["rank", "examples/user.json", "--quant", "int3"], "Invalid value for '--quant': 'int3' is not one of 'int4', 'nf4', 'int8', 'none'"),
    (["rank", "examples/user.json", "--compute", "fast"], "Invalid value for '--compute'"),
    (["export", "models/x", "out", "--int4-algo", "awq"], "Invalid value for '--int4-algo'"),
    (["train", "out", "--template", "chat"], "Invalid value for '--template': 'chat' is not one of 'list', 'instruct'"),
    (["fuse", "models/x", "--assistant", "a", "--renormalise", "maybe"], "Invalid value for '--renormalise'"),
    (["evaluate", "models/x", "--device", "tpu"], "Invalid value for '--device'"),
    (["nosuch"], "No such command 'nosuch'"),
    (["serve", "--replicas", "many"], "--replicas 'many': expected a number >= 1 or 'auto'"),
    (["bench", "--min-repeats", "3", "--max-repeats", "2"], "need --threads >= 1, 1 <= --min-repeats <= --max-repeats"),
    (["bench", "--backends", "torch-fp32,ort-int5"], "backend 'ort-int5': expected one of"),
    (["bench", "--out", "README.md"], "--out README.md is a file; bench writes a folder"),
    (["bench", "--variants", "own"], "--variants picks ablation variants: add --ablation"),
    (["bench", "--ablation", "--startup"], "two different measurements"),
    (["serve", "--port", "0"], "Invalid value for '--port'"),
    (["loadtest", "http://192.0.2.1:8000/rank", "-n", "1"], "not a loopback address"),
    (["loadtest", "http://127.0.0.1:9/rank", "-c", "0"], "Invalid value for '-c'"),
    (["loadtest", "http://127.0.0.1:99999/rank", "-n", "1"], "the port must be a number from 0 to 65535"),
    (["evaluate", "models/x", "--batch-users", "0"], "Invalid value for '--batch-users'"),
    (["rank", "examples/user.json", "--threads", "0"], "Invalid value for '--threads'"),
    (["evaluate", "models/hatllm-ml100k", "--no-assist", "--shortlist", "50"], "which --no-assist leaves out"),
    (["fidelity", "a", "b", "--threads", "-1"], "Invalid value for '--threads'"),
    (["sasrec", "evaluate", "models/x", "--threads", "0"], "Invalid value for '--threads'"),
    (["compare", "a.json", "b.json", "--samples", "0"], "Invalid value for '--samples'"),
    (["fidelity", "a", "b", "--candidates", "1"], "Invalid value for '--candidates'"),
    (["popularity", "--out", str(TESTS)], f"--out {TESTS} is a folder; give a file name"),
    (["evaluate", "models/x", "--out", str(TESTS)], f"--out {TESTS} is a folder"),
    (["sasrec", "report", "models/x", "--out", str(TESTS)], f"--out {TESTS} is a folder"),
    (["fuse", "models/x", "--assistant", "a", "--weights", "a,b"], "--weights 'a,b': expected numbers separated by commas"),
    (["fuse", "models/x", "--assistant", "a", "--shortlists", "1.5"], "--shortlists '1.5': expected whole numbers"),
    (["average", "out", "a", "b", "--weights", "x"], "--weights 'x': expected numbers separated by commas"),
])
def test_usage_errors_are_one_line(args: list[str], needle: str) -> None:
    """Typer's own usage errors read like every other bad input: one 'error:' line, exit code 2."""
    assert_usage_error(invoke(*args), needle)


def test_serve_without_ray_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Serve is an extra: without it, serve stops before loading anything, with the pip line."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    result = invoke("serve", "--model", "models/nosuch")
    assert result.exit_code == 1, (result.output, result.exception)
    assert result.stderr.strip().splitlines() == ["error: serving needs Ray Serve, the serve extra: pip install '.[serve]' in the checkout"]


# --- every command's help -------------------------------------------------------------------


def _commands() -> list[tuple[list[str], Any]]:
    import typer

    def walk(cmd: Any, path: list[str]) -> Any:
        yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, [*path, name])

    return list(walk(typer.main.get_command(app), []))


def _flags(cmd: Any) -> set[str]:
    return {o for p in cmd.params for o in [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]}


def test_every_help_text_shows_and_names_only_real_options() -> None:
    """Each command's --help exits 0, and every --flag its texts mention is one of its own
    options, or is named after another command that has it ('evaluate --renormalise')."""
    commands = _commands()
    by_name: dict[str, list[Any]] = {}
    for path, cmd in commands:
        if path:
            by_name.setdefault(path[-1], []).append(cmd)
    for path, cmd in commands:
        result = invoke(*path, "--help")
        assert result.exit_code == 0 and "Usage:" in result.stdout, (path, result.output)
        if hasattr(cmd, "commands"):
            continue
        text = " ".join([cmd.help or "", *(getattr(p, "help", None) or "" for p in cmd.params)])
        for m in re.finditer(r"(?<![\w-])--[a-z][a-z0-9-]*", text):
            flag = m.group(0)
            if flag in _flags(cmd):
                continue
            before = text[max(0, m.start() - 40) : m.start()]
            owners = [n for n in re.findall(r"[a-z]+", before) if any(flag in _flags(c) for c in by_name.get(n, []))]
            assert owners, f"'{' '.join(path)} --help' mentions {flag}, which it does not have: {text[max(0, m.start() - 60) : m.end()]!r}"


def test_one_spelling_per_concept() -> None:
    """--users means N users, a seeded sample (--first: the first N), wherever it appears;
    fuse's default grid reaches the shipped weight; no American spelling beside the British."""
    commands = {" ".join(path): cmd for path, cmd in _commands() if path and not hasattr(cmd, "commands")}
    for name, cmd in commands.items():
        users = [p for p in cmd.params if "--users" in getattr(p, "opts", [])]
        if users:
            assert "seeded sample" in users[0].help, name
        assert not any("normaliz" in f for f in _flags(cmd)), name
    fuse_weights = next(p for p in commands["fuse"].params if p.name == "weights").default
    from hatllm_edge.core.formats import ModelMeta

    shipped = ModelMeta.read(Path(__file__).resolve().parent.parent / "models" / "hatllm-ml100k" / "hatllm.json").decoding
    assert shipped.assistant_weight in [float(w) for w in fuse_weights.split(",")]


def test_out_is_checked_for_the_user_who_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As a user without write access (os.access answers for root here): a new file in a folder
    they cannot write is refused, an existing file they may write is accepted wherever it is."""
    import hatllm_edge.cli.common as common

    locked, existing = tmp_path / "locked", tmp_path / "locked" / "old.json"
    locked.mkdir()
    existing.write_text("{}")
    monkeypatch.setattr(common.os, "access", lambda path, mode: Path(path) == existing)
    assert_usage_error(invoke("popularity", "--out", locked / "new.json"), f"--out {locked / 'new.json'} cannot be written",
                       f"{locked} is not a writable folder")
    assert common.writable_file(existing) == existing
