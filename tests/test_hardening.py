"""Hostile and malformed input, end to end through ``hatllm-edge rank`` on a tiny int4 bundle:
bounds on every size a request controls, the int8 graph cache verified and bounded, the
graph's own metadata over bundle.json, the cache directory checked before anything loads, one
builder per bundle, and no traceback for anything (a seeded fuzz over request shapes)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_bundle
from typer.testing import CliRunner

from hatllm_edge.cli import app
from hatllm_edge.core.limits import MAX_CANDIDATES, MAX_HISTORY, MAX_K, MAX_REF_CHARS
from hatllm_edge.engine.cache import Int8Cache, clean_stale

ROOT = Path(__file__).resolve().parent.parent
TITLES = ["Alpha (1990)", "Beta (1991)", "Gamma, The (1992)", "Misérables, Les (1995)", "Delta (1993)", "Zeta (1995)"]
IDS = [f"i{n}" for n in range(1, len(TITLES) + 1)]
MAX_HISTORY_OF_MODEL = 3


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("HATLLM_DEBUG", raising=False)
    monkeypatch.setenv("HATLLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def bundle(tokenizer_json: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six items, the model reading the last 3 history items."""
    return tiny_bundle(tmp_path_factory.mktemp("hardening"), tokenizer_json, TITLES, IDS, MAX_HISTORY_OF_MODEL, "instruct")


def invoke(*args: Any) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def rank(bundle: Path, user: Path, *extra: Any) -> Any:
    return invoke("rank", user, "--model", bundle, "--threads", 1, "--quiet", *extra)


def write(path: Path, content: Any) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def assert_clean_exit(result: Any, code: int, *needles: str) -> None:
    """The exit code, no traceback anywhere, and on failure a last stderr line 'error: ...'
    that names the problem."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    if code:
        lines = result.stderr.strip().splitlines()
        assert lines and lines[-1].startswith("error: ") and len(lines) <= 3, result.stderr
        for needle in needles:
            assert needle in lines[-1], (needle, lines[-1])


def copy_bundle(bundle: Path, dest: Path) -> Path:
    dest.mkdir()
    for p in bundle.iterdir():
        (dest / p.name).write_bytes(p.read_bytes())
    return dest


# --------------------------------------------------------------------- bounds on the request


@pytest.mark.parametrize(("content", "flags", "needle"), [
    ({"history": ["i1"]}, ["--k", "-5"], "--k is -5; it must be from 1 to 100"),
    ({"history": ["i1"]}, ["--k", "0"], "--k is 0; it must be from 1 to 100"),
    ({"history": ["i1"]}, ["--k", "101"], "--k is 101"),
    ({"history": ["i1"]}, ["--beams", "0"], "--beams is 0; it must be from 1 to 100"),
    ({"history": ["i1"]}, ["--length-normalise"], "ranks the whole catalog; --length-normalise applies to scoring"),
    ({"history": ["i1"], "candidates": ["i2", "i3"]}, ["--beams", "4"], "scores its \"candidates\"; --beams shape"),
    ({"history": ["i1"], "candidates": ["i2", "i3"]}, ["--beams", "4", "--shortlist", "0"], "--beams and --shortlist"),
    ({"history": ["i1"], "k": 1_000_000}, [], "field 'k' is 1000000; it must be from 1 to 100"),
    ({"history": ["i1"], "k": 1e6}, [], "field 'k' must be an integer from 1 to 100"),
    ({"history": ["i1"], "k": -5}, [], "field 'k' is -5"),
    ({"history": ["i1"], "k": True}, [], "field 'k' must be an integer"),
    ({"history": ["i1"], "beams": 101}, [], "field 'beams' is 101; it must be from 1 to 100"),
    ({"history": ["i1"], "k": 7}, [], "k is 7 but the catalog has 6 items; ask for at most 6"),
    ({"history": ["i1"]}, ["--k", "7"], "k is 7 but the catalog has 6 items"),
    ({"history": ["i1"], "candidates": ["i2"] * (MAX_CANDIDATES + 1)}, [], f"the limit is {MAX_CANDIDATES:,}"),
    ({"history": ["x" * (MAX_REF_CHARS + 1)]}, [], f"has {MAX_REF_CHARS + 1} characters; the limit is {MAX_REF_CHARS}"),
    ({"history": ["i1"], "candidates": ["i2", "i3", "Beta (1991)"]}, [], "candidates[2]: 'Beta (1991)' is the same item as candidates[0]"),
    ({"history": ["i1"], "user_id": ["u"]}, [], "field 'user_id' must be a string or an integer"),
    ('{"history": ["i1"], "k": 3, "k": 5}', [], "field 'k' appears twice"),
    ('{"history": [' + "9" * 5000 + "]}", [], "more than 4,300 digits"),
    ('{"history": ["\\ud800"]}', [], "not valid Unicode"),
    (b'{"history": ["Alpha (1990)\xff"]}', [], "not UTF-8 text (byte 0xff at offset 26)"),
    ("[" * 100_000 + "]" * 100_000, [], "nested too deeply"),
])
def test_request_bounds(bundle: Path, tmp_path: Path, content: Any, flags: list[str], needle: str) -> None:
    assert_clean_exit(rank(bundle, write(tmp_path / "u.json", content), *flags), 2, needle)


def test_every_problem_of_a_request_is_named_at_once(bundle: Path, tmp_path: Path) -> None:
    """Schema problems and unknown titles in one message, unknown titles with their nearest
    catalog titles, so one edit fixes the request."""
    user = write(tmp_path / "u.json", {"history": ["i1", 2.5, "i2"], "k": 0, "colour": "red"})
    result = rank(bundle, user)
    assert_clean_exit(result, 2, "3 problems: ", "history[1]: expected an item id or title (string or integer), got 2.5",
                      "field 'k' is 0; it must be from 1 to 100", "unknown field 'colour'")
    titles = write(tmp_path / "t.json", {"history": ["i1", "Alpha (199)", "alpha  (1990)", "Zzzzz"], "candidates": ["i2", "Bta (1991)"]})
    result = rank(bundle, titles)
    assert_clean_exit(result, 2, "4 problems: ", "history[1]: 'Alpha (199)' is neither an item id nor an exact title in the catalog (",
                      "history[2]: 'alpha  (1990)' is neither", "(did you mean 'Alpha (1990)'?)",
                      "history[3]: 'Zzzzz' is neither an item id nor an exact title in the catalog;",
                      "candidates[1]: 'Bta (1991)' is neither", "'Beta (1991)'")


def test_a_history_past_the_request_limit_keeps_its_most_recent_items(bundle: Path, tmp_path: Path) -> None:
    history = ["i1"] * MAX_HISTORY + ["i2", "i3"]
    long = rank(bundle, write(tmp_path / "u.json", {"history": history, "k": 2}), "--include-history")
    assert_clean_exit(long, 0)
    assert f"the history has {MAX_HISTORY + 2:,} items; the most recent {MAX_HISTORY:,} are kept" in long.stderr
    cut = rank(bundle, write(tmp_path / "c.json", {"history": history[-MAX_HISTORY:], "k": 2}), "--include-history")
    assert json.loads(long.stdout)["results"] == json.loads(cut.stdout)["results"]


def test_rank_reads_the_request_from_stdin(bundle: Path) -> None:
    result = CliRunner().invoke(app, ["rank", "-", "--model", str(bundle), "-q"], input=json.dumps({"history": ["i1"], "k": 2}))
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["results"]) == 2
    bad = CliRunner().invoke(app, ["rank", "-", "--model", str(bundle), "-q"], input='{"history": []}')
    assert bad.exit_code == 2 and "<stdin>: field 'history' must be a non-empty list" in bad.stderr
    unknown = CliRunner().invoke(app, ["rank", "-", "--model", str(bundle), "-q"], input='{"history": ["Alpha"]}')
    assert unknown.exit_code == 2 and "<stdin>: history[0]: 'Alpha' is neither" in unknown.stderr


def test_a_bom_is_accepted_and_the_largest_k_runs(bundle: Path, tmp_path: Path) -> None:
    user = write(tmp_path / "u.json", b"\xef\xbb\xbf" + json.dumps({"history": ["i1"], "k": len(TITLES)}).encode())
    result = rank(bundle, user)
    assert_clean_exit(result, 0)
    assert len(json.loads(result.stdout)["results"]) == len(TITLES) - 1  # all but the history's one item
    assert MAX_K >= len(TITLES)


def test_a_history_longer_than_the_model_reads_is_cut_with_a_warning(bundle: Path, tmp_path: Path) -> None:
    # history included: the two lists then differ only by what the model read
    long = rank(bundle, write(tmp_path / "long.json", {"history": ["i1", "i2", "i3", "i4", "i5"], "k": 3}), "--include-history")
    assert_clean_exit(long, 0)
    assert ("warning: " in long.stderr and "the history has 5 items; the model reads only the last 3" in long.stderr
            and "the oldest 2 are left out" in long.stderr)
    cut = rank(bundle, write(tmp_path / "cut.json", {"history": ["i3", "i4", "i5"], "k": 3}), "--include-history")
    assert_clean_exit(cut, 0)
    assert "warning" not in cut.stderr
    assert json.loads(long.stdout)["results"] == json.loads(cut.stdout)["results"]  # what the model read


@pytest.mark.parametrize(("ref", "exact"), [
    ("alpha (1990)", "Alpha (1990)"),
    ("  Gamma,   The  (1992) ", "Gamma, The (1992)"),
    ("Mise\u0301rables, Les (1995)", "Misérables, Les (1995)"),  # NFD of the catalog's NFC title
    ("ＢＥＴＡ (1991)", "Beta (1991)"),  # full-width letters (NFKC)
    ("I1", "i1"),
])
def test_a_near_title_is_refused_with_the_exact_one(bundle: Path, tmp_path: Path, ref: str, exact: str) -> None:
    result = rank(bundle, write(tmp_path / "u.json", {"history": ["i2", ref]}))
    assert_clean_exit(result, 2, "history[1]", "is neither an item id nor an exact title", f"did you mean {exact!r}?")


def test_beam_width_is_max_of_beams_and_k_and_lists_are_prefixes(bundle: Path, tmp_path: Path) -> None:
    lists = []
    for k in range(1, 5):
        out = json.loads(rank(bundle, write(tmp_path / "u.json", {"history": ["i1", "i2"], "k": k}), "--beams", 4).stdout)
        assert out["beams"] == 4
        lists.append([r["item_id"] for r in out["results"]])
    assert all(lists[k - 1] == lists[-1][:k] for k in range(1, 5)), lists
    out = json.loads(rank(bundle, write(tmp_path / "u.json", {"history": ["i1"], "k": 5, "beams": 2})).stdout)
    assert out["beams"] == 5 and len(out["results"]) == 5  # never narrower than k
    out = json.loads(rank(bundle, write(tmp_path / "u.json", {"history": ["i1"], "k": 2})).stdout)
    assert out["beams"] == 10  # DEFAULT_BEAMS


# --------------------------------------------------------------------- what the engine runs is verified


def test_a_damaged_int8_graph_is_rebuilt_not_run(bundle: Path, tmp_path: Path, _cache: Path) -> None:
    user = write(tmp_path / "u.json", {"history": ["i1", "i2"], "candidates": IDS[2:]})
    first = rank(bundle, user)
    assert_clean_exit(first, 0)
    graphs = list((_cache / "int8").glob("*.onnx"))
    assert len(graphs) == 1 and (_cache / "int8" / (graphs[0].name + ".sha256")).is_file()
    good = graphs[0].read_bytes()

    def damaged(data: bytes) -> None:
        graphs[0].write_bytes(data)
        result = rank(bundle, user)
        assert_clean_exit(result, 0)
        assert "warning: cached int8 graph" in result.stderr and "rebuilding it from the verified bundle" in result.stderr
        assert json.loads(result.stdout)["results"] == json.loads(first.stdout)["results"]
        assert graphs[0].read_bytes() == good  # rebuilt, and the next call is silent again
        again = rank(bundle, user)
        assert_clean_exit(again, 0)
        assert "warning" not in again.stderr

    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x10
    damaged(bytes(flipped))  # one bit: would have loaded and scored differently
    zeroed = bytearray(good)
    zeroed[100:4100] = bytes(4000)
    damaged(bytes(zeroed))  # a zeroed region: InvalidProtobuf before
    (graphs[0].parent / (graphs[0].name + ".sha256")).unlink()
    damaged(good)  # no hash beside it: not trusted

    import hashlib

    graphs[0].write_bytes(b"garbage that hashes right")
    (graphs[0].parent / (graphs[0].name + ".sha256")).write_text(hashlib.sha256(b"garbage that hashes right").hexdigest())
    result = rank(bundle, user)  # matches its hash but does not load: rebuilt too
    assert_clean_exit(result, 0)
    assert "does not load" in result.stderr and "rebuilding it from the verified bundle" in result.stderr
    assert json.loads(result.stdout)["results"] == json.loads(first.stdout)["results"]


def test_int8_cache_keeps_the_most_recently_used(tmp_path: Path) -> None:
    cache = Int8Cache(tmp_path, keep=3)
    for n in range(3):
        cache.write(f"k{n}", b"graph %d" % n)
        os.utime(cache.path(f"k{n}"), (time.time() - 100 + n, time.time() - 100 + n))
    assert cache.read("k0") == b"graph 0"  # a use makes k0 the most recent
    cache.write("k3", b"graph 3")
    assert sorted(p.stem for p in (tmp_path / "int8").glob("*.onnx")) == ["k0", "k2", "k3"]
    assert not (tmp_path / "int8" / "k1.onnx.sha256").exists()
    (tmp_path / "int8" / ".k9.onnx.999999999.tmp").write_bytes(b"left by a writer that died")
    cache.evict()
    assert not list((tmp_path / "int8").glob(".*.tmp"))


def test_the_graph_metadata_wins_over_bundle_json(bundle: Path, tmp_path: Path) -> None:
    from hatllm_edge.export import write_manifest

    user = write(tmp_path / "u.json", {"history": ["i1"], "k": 2})
    edited = copy_bundle(bundle, tmp_path / "edited")
    meta = json.loads((edited / "bundle.json").read_text())
    meta["export"]["quant"] = "none"
    (edited / "bundle.json").write_text(json.dumps(meta))
    write_manifest(edited)  # the manifest regenerated over the edit: the hashes alone pass
    assert_clean_exit(rank(edited, user), 2, "bundle.json says quant none but model.onnx records int4")

    swapped = copy_bundle(bundle, tmp_path / "swapped")
    (swapped / "catalog.jsonl").write_text('{"item_id": "i1", "title": "Other"}\n')
    write_manifest(swapped)
    assert_clean_exit(rank(swapped, user), 2, "catalog.jsonl is not the file model.onnx was exported with")

    unlisted = copy_bundle(bundle, tmp_path / "unlisted")  # swapped, and its entry dropped so nothing hashes it
    (unlisted / "catalog.jsonl").write_text('{"item_id": "i1", "title": "Other"}\n')
    manifest = json.loads((unlisted / "manifest.json").read_text())
    del manifest["files"]["catalog.jsonl"]
    (unlisted / "manifest.json").write_text(json.dumps(manifest))
    assert_clean_exit(rank(unlisted, user), 2, "manifest.json does not list catalog.jsonl, which model.onnx was exported with")


@pytest.mark.parametrize(("name", "garble", "needle"), [
    ("model.onnx", lambda b: b[:1000] + bytes(5000) + b[6000:], "model.onnx"),
    ("model.onnx", lambda b: b"not a graph", "model.onnx"),
    ("bundle.json", lambda b: b"{garbled", "bundle.json is not readable JSON"),
    ("bundle.json", lambda b: b"[]", "bundle.json: expected a JSON object"),
    ("tokenizer.json", lambda b: b"{}", "tokenizer.json"),
])
def test_a_garbled_bundle_with_a_regenerated_manifest_is_one_line(bundle: Path, tmp_path: Path, name: str,
                                                                   garble: Any, needle: str) -> None:
    from hatllm_edge.export import write_manifest

    bad = copy_bundle(bundle, tmp_path / "bad")
    (bad / name).write_bytes(garble((bad / name).read_bytes()))
    write_manifest(bad)
    for compute in ("auto", "native"):
        assert_clean_exit(rank(bad, write(tmp_path / "u.json", {"history": ["i1"]}), "--compute", compute), 2, needle)


def test_a_manifest_that_leaves_out_the_graph_is_refused(bundle: Path, tmp_path: Path) -> None:
    bad = copy_bundle(bundle, tmp_path / "bad")
    manifest = json.loads((bad / "manifest.json").read_text())
    del manifest["files"]["model.onnx"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    assert_clean_exit(rank(bad, write(tmp_path / "u.json", {"history": ["i1"]})), 2, "manifest.json does not list model.onnx")


# --------------------------------------------------------------------- the cache directory


def fake_checkpoint(folder: Path) -> Path:
    """Enough of a checkpoint for the bundle cache to key it: its metadata, no weights."""
    from hatllm_edge.core.formats import ModelMeta, PromptMeta

    folder.mkdir()
    ModelMeta(schedule={"num_layers": 2, "n_in": 1, "n_cr": 1}, prompt=PromptMeta("<|im_end|>", 10, "list")).write(folder / "hatllm.json")
    return folder


@pytest.mark.parametrize(("value", "needle"), [
    ("", "HATLLM_CACHE is set but empty"),
    ("  ", "HATLLM_CACHE is set but empty"),
    ("FILE", "exists and is not a folder"),
    ("/dev/null/cache", "must be a writable folder"),
])
def test_an_unusable_cache_is_refused_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     value: str, needle: str) -> None:
    import hatllm_edge.export.checkpoint

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("loaded a model")

    monkeypatch.setattr(hatllm_edge.export.checkpoint, "export_checkpoint", no_loading)
    if value == "FILE":
        value = str(write(tmp_path / "a-file", "x"))
    monkeypatch.setenv("HATLLM_CACHE", value)
    monkeypatch.chdir(tmp_path)
    result = invoke("rank", write(tmp_path / "u.json", {"history": ["i1"]}), "--model", fake_checkpoint(tmp_path / "ck"), "-q")
    assert_clean_exit(result, 2, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["u.json", "ck"] + (["a-file"] if "a-file" in value else []))


def test_an_unwritable_cache_still_runs_a_built_bundle(bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HATLLM_CACHE", "/dev/null/cache")
    result = rank(bundle, write(tmp_path / "u.json", {"history": ["i1"], "k": 2}))
    assert_clean_exit(result, 0)
    assert "warning: cannot write to /dev/null/cache/int8" in result.stderr and "runs at every load" in result.stderr


BUILDER = """
import os, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, {root!r})
from hatllm_edge.engine.cache import partial_prefix

def export_checkpoint(checkpoint, out, quant, dtype, progress=True, overwrite=False):
    # the publish step of hatllm_edge.export.bundle: build in a partial folder beside the target, rename
    with open({log!r}, "a") as f:
        f.write(f"{{os.getpid()}}\\n")
    tmp = Path(tempfile.mkdtemp(prefix=partial_prefix(out), dir=out.parent))
    time.sleep(0.5)
    (tmp / "bundle.json").write_text("{{}}")
    tmp.rename(out)  # another builder's bundle already there: OSError, Directory not empty
    return out

from hatllm_edge.app.models import cached_bundle
print(cached_bundle(Path({checkpoint!r}), "int4", progress=False,
                    build=lambda c, o, q, d, p: export_checkpoint(c, o, q, d, progress=p, overwrite=True)))
"""


def test_processes_building_one_bundle_take_turns(tmp_path: Path, _cache: Path) -> None:
    """Four processes ask for the same bundle on an empty cache at once: one builds, the others
    wait and reuse it (before: each built, and renames onto the published folder failed with
    'Directory not empty')."""
    checkpoint = fake_checkpoint(tmp_path / "ck")
    log = tmp_path / "builds.log"
    script = BUILDER.format(root=str(ROOT), log=str(log), checkpoint=str(checkpoint))
    env = {**os.environ, "HATLLM_CACHE": str(_cache)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err for _, err in outs]
    assert len({out.strip() for out, _ in outs}) == 1
    assert len(log.read_text().split()) == 1  # one build
    folder = Path(outs[0][0].strip())
    assert (folder / "bundle.json").is_file()
    assert not [p for p in folder.parent.iterdir() if ".partial-" in p.name]
    assert sum("waiting for another process" in err for _, err in outs) >= 1


def test_stale_partial_folders_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "onnx-int4"
    dead = tmp_path / ".onnx-int4.partial-999999999-abc"  # no such pid
    live = tmp_path / f".onnx-int4.partial-{os.getppid()}-def"  # a live pid, recent
    old = tmp_path / f".onnx-int4.partial-{os.getppid()}-ghi"  # a live pid (reused?), two hours old
    legacy = tmp_path / ".onnx-int4.partial-jkl"  # the old naming, without a pid: by age only
    other = tmp_path / ".onnx-nf4.partial-999999999-abc"  # another target's
    for p in (dead, live, old, legacy, other):
        p.mkdir()
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert sorted(clean_stale(target)) == sorted([dead, old])
    assert live.is_dir() and legacy.is_dir() and other.is_dir()


# --------------------------------------------------------------------- fuzz: no input prints a traceback


def _fuzz_requests(seed: int, n: int) -> list[tuple[str, bytes]]:
    """Seeded request files of every shape: wrong types, nesting, huge and negative numbers,
    unknown fields, empty lists, duplicates, long strings, bad bytes. Each comes with a label."""
    rng = random.Random(seed)
    good = IDS + TITLES
    bad = [1, 0, -1, 10**30, "", " ", "x" * (MAX_REF_CHARS + rng.randint(1, 50)), "alpha (1990)", "\u0000", "\ud800"]

    def ref() -> Any:
        return rng.choice(good) if rng.random() < 0.85 else rng.choice(bad)

    junk: list[Any] = [None, True, False, 0, -1, 1.5, float("inf"), 10**40, "", "s", [], {}, [[]], {"a": 1}, [None],
                       "x" * 5000, list(range(3)), -(10**20)]

    def value() -> Any:
        return rng.choice(junk) if rng.random() < 0.5 else [ref() for _ in range(rng.randint(0, 4))]

    out: list[tuple[str, bytes]] = []
    for i in range(n):
        req: dict[str, Any] = {"history": [ref() for _ in range(rng.randint(0, 5))]}
        for field in ("candidates", "k", "beams", "user_id"):
            if rng.random() < 0.4:
                req[field] = rng.choice([value(), rng.randint(-3, 8), ref()])
        if rng.random() < 0.15:
            req[rng.choice(["extra", "K", "history ", "candidate"])] = value()
        if rng.random() < 0.15:
            req["history"] = value()
        if rng.random() < 0.1:
            del req["history"]
        if rng.random() < 0.1:
            req["candidates"] = [rng.choice(IDS)] * rng.randint(2, 3)  # duplicates
        data = json.dumps(req if rng.random() > 0.08 else rng.choice([value(), [req], "req", 3])).encode()
        kind = rng.random()
        if kind < 0.06:
            data = data[: rng.randint(0, len(data))]  # truncated
        elif kind < 0.12:
            at = rng.randint(0, len(data))
            data = data[:at] + bytes([rng.choice([0xff, 0xc3, 0x80, 0xfe])]) + data[at:]  # not UTF-8
        elif kind < 0.15:
            depth = rng.choice([50, 5000, 200_000])
            data = b'{"history": ' + b"[" * depth + b"]" * depth + b"}"
        elif kind < 0.17:
            data = data.replace(b'"history"', b'"history": [], "history"', 1)  # a repeated key
        out.append((f"case {i}: {data[:80]!r}", data))
    return out


def test_fuzz_requests_exit_0_or_2_and_never_a_traceback(bundle: Path, tmp_path: Path) -> None:
    cases = _fuzz_requests(seed=10, n=80)
    codes = []
    for label, data in cases:
        result = rank(bundle, write(tmp_path / "u.json", data))
        assert result.exit_code in (0, 2), (label, result.exit_code, result.output)
        assert_clean_exit(result, result.exit_code)
        if result.exit_code == 0:
            json.loads(result.stdout)
        codes.append(result.exit_code)
    print(f"fuzz: {codes.count(0)} valid, {codes.count(2)} refused")
    assert codes.count(0) >= 5 and codes.count(2) >= 50  # both kinds were exercised


def test_an_unexpected_failure_is_one_line_and_exit_1(bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hatllm_edge.app.rank as rank_request

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(rank_request, "run_rank", broken)
    user = write(tmp_path / "u.json", {"history": ["i1"]})
    result = rank(bundle, user)
    assert_clean_exit(result, 1)
    assert result.stderr.strip() == "error: unexpected RuntimeError: something broke (HATLLM_DEBUG=1 shows the traceback)"
    monkeypatch.setenv("HATLLM_DEBUG", "1")
    assert isinstance(rank(bundle, user).exception, RuntimeError)  # the traceback, for whoever debugs
