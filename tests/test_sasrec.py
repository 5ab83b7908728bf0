"""SASRec baseline: training windows, full-catalog ranking, causality and padding, training on a
tiny synthetic data set, resume, checkpoints, and the ONNX graph against PyTorch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hatllm_edge.core.data import Catalog, Dataset, Example
from hatllm_edge.core.errors import InputError
from hatllm_edge.core.metrics import mean_metrics
from hatllm_edge.training import sasrec as S
from hatllm_edge.training.resume import STATE_FILE


def _tiny(num_items: int = 30, max_len: int = 8, heads: int = 2, seed: int = 0) -> S.SASRec:
    torch.manual_seed(seed)
    return S.SASRec(S.SASRecConfig(num_items=num_items, max_len=max_len, hidden=16, heads=heads, dropout=0.3)).eval()


# --------------------------------------------------------------------------- windows


@pytest.mark.parametrize("max_len,stride,random", [(8, 8, False), (8, 3, False), (8, 8, True), (8, 1, True), (5, 2, True)])
def test_windows_train_every_target_once_with_its_own_history(max_len: int, stride: int, random: bool) -> None:
    # unique ids, so an id says which sequence and position it is
    lengths = [1, 2, 5, 8, 9, 17, 40]
    seqs, start = [], 1
    for n in lengths:
        seqs.append(list(range(start, start + n)))
        start += n
    rng = np.random.default_rng(3) if random else None
    ins, tgts = S.training_windows(seqs, max_len, stride, rng)
    assert ins.shape == tgts.shape and ins.shape[1] == max_len
    seen: list[int] = []
    where = {i: (s, j) for s, seq in enumerate(seqs) for j, i in enumerate(seq)}
    for row_in, row_t in zip(ins, tgts):
        items = row_in[row_in != 0]
        assert (row_in[: max_len - len(items)] == 0).all(), "inputs are left-padded"
        s, j0 = where[int(items[0])]
        assert items.tolist() == seqs[s][j0 : j0 + len(items)], "a window is a contiguous slice"
        for c in np.flatnonzero(row_t):
            t_seq, t_pos = where[int(row_t[c])]
            context = row_in[: c + 1][row_in[: c + 1] != 0].tolist()
            assert t_seq == s and context == seqs[s][t_pos - len(context) : t_pos], "target follows its context"
            assert len(context) >= min(t_pos, max_len - stride + 1), "context: max_len - stride + 1 or all there is"
            seen.append(int(row_t[c]))
    expected = [i for seq in seqs for i in seq[1:]]
    assert sorted(seen) == sorted(expected), "every next-item target exactly once"


def test_windows_reject_a_stride_over_max_len() -> None:
    with pytest.raises(InputError):
        S.training_windows([[1, 2, 3]], 4, 5)


# --------------------------------------------------------------------------- ranking


def test_target_ranks_count_better_items_and_break_ties_by_catalog_order() -> None:
    scores = np.array([[0.1, 0.5, 0.3, 0.5, 0.0],
                       [0.1, 0.5, 0.3, 0.5, 0.0],
                       [0.1, 0.5, 0.3, 0.5, 0.0],
                       [1.0, 1.0, 1.0, 1.0, 1.0]])
    ranks = S.target_ranks(scores, np.array([1, 3, 4, 2]))
    # the same order as a stable sort by descending score: 1, 3, 2, 0, 4 (rows 0-2); 0..4 (row 3)
    assert ranks.tolist() == [0, 1, 4, 2]
    order = np.argsort(-scores[0], kind="stable")
    assert [int(np.flatnonzero(order == t)[0]) for t in (1, 3, 4)] == ranks[:3].tolist()


def test_evaluation_of_a_known_distribution_gives_the_expected_metrics() -> None:
    # the scorer always prefers items in reverse catalog order: item k (of 20) has rank 19 - k
    ids = tuple(str(i) for i in range(20))
    catalog = Catalog(ids, tuple(f"t{i}" for i in ids))
    targets = {"a": "19", "b": "17", "c": "10", "d": "0"}  # ranks 0, 2, 9, 19
    examples = [Example(u, ("3", "4"), t) for u, t in targets.items()]
    calls = []

    def scorer(x: np.ndarray) -> np.ndarray:
        calls.append(x.copy())
        return np.log(np.tile(np.arange(1, 21, dtype=np.float64) / 210.0, (len(x), 1)))

    ranks = S.rank_examples(scorer, examples, catalog, max_len=4, batch_size=3)
    assert ranks == {"a": 0, "b": 2, "c": 9, "d": 19}
    assert [c.shape for c in calls] == [(3, 4), (1, 4)]
    assert calls[0][0].tolist() == [0, 0, 4, 5], "history as catalog position + 1, left-padded"
    m = mean_metrics(list(ranks.values()))
    assert m["HR@1"] == pytest.approx(0.25) and m["HR@5"] == pytest.approx(0.5) and m["HR@10"] == pytest.approx(0.75)
    assert m["NDCG@5"] == pytest.approx((1 + 0.5) / 4)
    assert m["NDCG@10"] == pytest.approx((1 + 0.5 + 1 / math.log2(11)) / 4)


def test_excluded_items_leave_the_ranking() -> None:
    # scores prefer later catalog items; leaving out items above the target lifts it by their number
    ids = tuple(str(i) for i in range(20))
    catalog = Catalog(ids, tuple(f"t{i}" for i in ids))
    examples = [Example("a", ("18", "19"), "10"), Example("b", ("3",), "10")]

    def scorer(x: np.ndarray) -> np.ndarray:
        return np.tile(np.arange(20, dtype=np.float32), (len(x), 1))

    assert S.rank_examples(scorer, examples, catalog, max_len=4) == {"a": 9, "b": 9}
    excluded = S.rank_examples(scorer, examples, catalog, max_len=4,
                               exclude=lambda ex: {catalog.index(i) for i in ex.history})
    assert excluded == {"a": 7, "b": 9}, "items above the target leave; items below do not move it"


def test_seen_items_are_the_whole_history_before_the_target() -> None:
    ids = tuple(str(i) for i in range(6))
    data = Dataset("toy", Catalog(ids, tuple(f"t{i}" for i in ids)), {"u": ("0", "1", "2", "3", "4")})
    assert data.seen("u", "test") == {0, 1, 2, 3} and data.seen("u", "valid") == {0, 1, 2}
    (ex,) = data.split("test", max_history=2)
    assert ex.history == ("2", "3") and data.seen("u", "test") > {data.catalog.index(i) for i in ex.history}


# --------------------------------------------------------------------------- model


def test_causal_and_independent_of_left_padding() -> None:
    model = _tiny()
    x = torch.tensor([[3, 4, 5, 6, 7]])
    changed = torch.tensor([[3, 4, 5, 29, 28]])
    with torch.no_grad():
        a, b = model.encode(x), model.encode(changed)
        assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6), "a position must not see later items"
        assert not torch.allclose(a[:, 3:], b[:, 3:], atol=1e-3)
        padded = torch.tensor([[0, 0, 0, 3, 4, 5, 6, 7]])
        assert torch.allclose(model(x), model(padded), atol=1e-5), "padding must not change the scores"
        longer = torch.tensor([[9, 9, 9, 9, 9, 1, 2, 3, 4, 5, 6, 7, 8]])
        assert torch.allclose(model(longer), model(longer[:, -8:]), atol=1e-6), "only the last max_len items count"
        lp = model(torch.tensor([[0, 0, 0], [1, 2, 3]]))
        assert lp.shape == (2, 30) and torch.allclose(lp.exp().sum(-1), torch.ones(2), atol=1e-5)


def test_onnx_matches_pytorch(tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    model = _tiny(num_items=37, max_len=8, heads=2)
    path = S.export_model_onnx(model, tmp_path / "m.onnx")
    assert not model.training, "export leaves the model in the mode it found it"
    graph = onnx.load(str(path))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in graph.graph.input] == ["item_ids"] and [o.name for o in graph.graph.output] == ["scores"]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for x in (np.array([[0, 0, 1, 2, 3], [4, 5, 6, 7, 36], [0, 0, 0, 0, 37]]),
              np.array([[5]]),
              np.random.default_rng(0).integers(0, 38, size=(4, 12))):  # longer than max_len: cut to the last 8
        got = sess.run(["scores"], {"item_ids": x.astype(np.int64)})[0]
        want = model(torch.from_numpy(x)).detach().numpy()
        assert got.shape == (len(x), 37)
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert S.onnx_parity(model, path)["max_abs_diff"] < 1e-5


# --------------------------------------------------------------------------- training


def _cycle_files(folder: Path, items: int = 12, users: int = 30, length: int = 14) -> tuple[Path, Path]:
    """Every user walks the cycle 1 -> 2 -> ... -> items -> 1 from a random start: the next item
    is always determined by the last one."""
    rng = np.random.default_rng(0)
    rows = ["user_id,item_id,timestamp"]
    for u in range(users):
        start = int(rng.integers(0, items))
        rows += [f"u{u},{(start + t) % items + 1},{t}" for t in range(length)]
    inter, item_file = folder / "inter.csv", folder / "items.csv"
    inter.write_text("\n".join(rows) + "\n", encoding="utf-8")
    item_file.write_text("item_id,title\n" + "".join(f"{i},Movie {i}\n" for i in range(1, items + 1)), encoding="utf-8")
    return inter, item_file


def _cfg(out: Path, inter: Path, items: Path, **kw: object) -> S.TrainConfig:
    base = dict(out=out, interactions=inter, items=items, max_len=8, hidden=16, heads=1, blocks=1, dropout=0.1,
                stride=8, batch_size=8, lr=1e-2, warmup_steps=2, max_epochs=6, patience=50, threads=1, seed=0)
    base.update(kw)
    return S.TrainConfig(**base)  # type: ignore[arg-type]


def test_training_lowers_the_loss_and_learns_a_deterministic_successor(tmp_path: Path) -> None:
    inter, items = _cycle_files(tmp_path)
    out = tmp_path / "run"
    summary = S.train(_cfg(out, inter, items, max_epochs=8), progress=False)
    log = [json.loads(line) for line in (out / S.LOG_FILE).read_text().splitlines()]
    assert len(log) == 8 and summary["epochs"] == 8 and summary["steps"] == log[-1]["step"]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"], [r["loss"] for r in log]
    best = max(range(8), key=lambda i: (log[i]["valid"]["NDCG@10"], -i))
    assert summary["chosen_epoch"] == best + 1 and summary["valid_at_chosen_epoch"] == log[best]["valid"]
    meta = S.read_config(out)
    assert meta["item_ids"] == [str(i) for i in range(1, 13)] and meta["model"]["num_items"] == 12
    # the saved (best) weights reproduce the chosen epoch's validation metrics, on PyTorch and ONNX
    res = S.evaluate_checkpoint(out, "valid", interactions=inter, items=items)
    assert res["metrics"] == log[best]["valid"] and res["users"] == 30
    assert res["metrics"]["HR@1"] >= 0.9, res["metrics"]
    test = S.evaluate_checkpoint(out, "test", interactions=inter, items=items)
    assert set(test["ranks"]) == {f"u{u}" for u in range(30)} and test["metrics"]["HR@1"] >= 0.9
    report = S.export_checkpoint_onnx(out)
    assert report["max_abs_diff"] < 1e-4
    test_ort = S.evaluate_checkpoint(out, "test", interactions=inter, items=items, backend="onnx")
    assert test_ort["ranks"] == test["ranks"]


def test_resume_continues_exactly(tmp_path: Path) -> None:
    inter, items = _cycle_files(tmp_path, users=12)
    S.train(_cfg(tmp_path / "a", inter, items, max_epochs=4), progress=False)
    S.train(_cfg(tmp_path / "b", inter, items, max_epochs=2), progress=False)
    S.train(_cfg(tmp_path / "b", inter, items, max_epochs=4), resume=True, progress=False)
    a = torch.load(tmp_path / "a" / STATE_FILE, weights_only=False)
    b = torch.load(tmp_path / "b" / STATE_FILE, weights_only=False)
    assert a["progress"]["step"] == b["progress"]["step"]
    for k, v in a["weights"].items():
        assert torch.equal(v, b["weights"][k]), k
    with pytest.raises(InputError, match="lr"):
        S.train(_cfg(tmp_path / "b", inter, items, max_epochs=5, lr=3e-3), resume=True, progress=False)


def test_checkpoint_refuses_another_catalog(tmp_path: Path) -> None:
    inter, items = _cycle_files(tmp_path, users=4)
    out = tmp_path / "run"
    S.train(_cfg(out, inter, items, max_epochs=1), progress=False)
    model, meta = S.load_checkpoint(out)
    assert isinstance(model, S.SASRec) and not model.training
    other = tmp_path / "items2.csv"
    other.write_text("item_id,title\n" + "".join(f"{i},Movie {i}\n" for i in range(12, 0, -1)), encoding="utf-8")
    with pytest.raises(InputError, match="item ids"):
        S.evaluate_checkpoint(out, "test", interactions=inter, items=other)
    with pytest.raises(InputError, match="not a SASRec checkpoint"):
        S.read_config(tmp_path)


def test_dataset_object_path_matches_files(tmp_path: Path) -> None:
    # train() accepts a loaded Dataset; the training parts are seq[:-2] as catalog position + 1
    data = Dataset("toy", Catalog(("x", "y", "z"), ("X", "Y", "Z")), {"u": ("z", "x", "y", "z", "x"), "v": ("y", "z")})
    assert S.train_sequences(data) == [[3, 1, 2], []]
