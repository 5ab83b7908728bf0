"""SASRec baseline from the command line (until the CLI has a ``sasrec`` command).

    python scripts/train_sasrec.py train runs/sasrec-ml100k --threads 1 [--resume]
    python scripts/train_sasrec.py evaluate runs/sasrec-ml100k --split test [--backend onnx] [--out FILE]
    python scripts/train_sasrec.py export runs/sasrec-ml100k [--out FILE] [--opset 17]
    python scripts/train_sasrec.py report runs/sasrec-ml100k --out results/sasrec/ml100k.json

``report`` evaluates the checkpoint on validation and test (PyTorch), exports it to ONNX, checks
ONNX Runtime against PyTorch on the test split (same ranks), and writes the test JSON (readable
by ``hatllm-edge compare``) plus ``<out stem>_valid.json`` beside it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hatllm_edge import sasrec  # noqa: E402


def _command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]).as_posix())] + sys.argv[1:])


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--interactions", type=Path)
    p.add_argument("--items", type=Path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train; keep the best weights by validation NDCG@10")
    t.add_argument("out", type=Path)
    _data_args(t)
    defaults = sasrec.TrainConfig(out=Path("."))
    for name in ("max_len", "hidden", "heads", "blocks", "stride", "batch_size", "warmup_steps", "max_epochs", "patience",
                 "eval_every", "eval_batch", "threads", "seed"):
        t.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("dropout", "lr", "weight_decay", "max_minutes"):
        t.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    t.add_argument("--schedule", choices=("constant", "cosine"), default=defaults.schedule)
    t.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt (same flags)")
    t.add_argument("-q", "--quiet", action="store_true")

    e = sub.add_parser("evaluate", help="loo-full metrics and per-user ranks")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("--split", choices=("valid", "test"), default="test")
    e.add_argument("--backend", choices=("torch", "onnx"), default="torch")
    e.add_argument("--onnx", type=Path, help="ONNX file (default: CHECKPOINT/sasrec.onnx)")
    e.add_argument("--threads", type=int)
    e.add_argument("--out", type=Path)
    _data_args(e)

    x = sub.add_parser("export", help="ONNX (item_ids [B, L] -> scores [B, num_items]), checked against PyTorch")
    x.add_argument("checkpoint", type=Path)
    x.add_argument("--out", type=Path)
    x.add_argument("--opset", type=int, default=17)

    r = sub.add_parser("report", help="valid + test metrics, ONNX export and check, results JSON")
    r.add_argument("checkpoint", type=Path)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--threads", type=int)
    _data_args(r)

    a = ap.parse_args(argv)
    if a.cmd == "train":
        cfg = sasrec.TrainConfig(**{k: v for k, v in vars(a).items() if k not in ("cmd", "resume", "quiet")})
        t0 = time.perf_counter()
        summary = sasrec.train(cfg, resume=a.resume, progress=not a.quiet)
        meta = sasrec.read_meta(a.out)
        meta["command"] = _command()
        meta["training"]["wall_s"] = round(time.perf_counter() - t0, 1)
        (a.out / sasrec.CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        print(json.dumps(summary, indent=1))
    elif a.cmd == "evaluate":
        res = sasrec.evaluate_checkpoint(a.checkpoint, a.split, a.dataset, a.interactions, a.items, a.backend, a.onnx, a.threads)
        res["command"] = _command()
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
        print(json.dumps({k: v for k, v in res.items() if k != "ranks"}, indent=1))
    elif a.cmd == "export":
        print(json.dumps(sasrec.export_checkpoint_onnx(a.checkpoint, a.out, a.opset), indent=1))
    elif a.cmd == "report":
        report(a)
    return 0


def report(a: argparse.Namespace) -> None:
    meta = sasrec.read_meta(a.checkpoint)
    data_args = (a.dataset, a.interactions, a.items)
    valid = sasrec.evaluate_checkpoint(a.checkpoint, "valid", *data_args, threads=a.threads)
    test = sasrec.evaluate_checkpoint(a.checkpoint, "test", *data_args, threads=a.threads)
    onnx = sasrec.export_checkpoint_onnx(a.checkpoint)
    test_ort = sasrec.evaluate_checkpoint(a.checkpoint, "test", *data_args, backend="onnx", threads=a.threads)
    same = sum(test_ort["ranks"][u] == r for u, r in test["ranks"].items())
    onnx.update(test_metrics=test_ort["metrics"], test_same_rank_users=same, test_users=test["users"], test_wall_s=test_ort["wall_s"])
    common = {"model": "sasrec", "checkpoint": str(a.checkpoint), "config": meta["model"], "train_config": meta.get("train_config"),
              "training": meta.get("training"), "train_command": meta.get("command"), "command": _command(),
              "ranks_note": "0-based rank of the target among all catalog items (history not removed; ties by catalog order)"}
    out = {**common, "split": "test", "users": test["users"], "metrics": test["metrics"],
           "valid_metrics": valid["metrics"], "eval_wall_s": test["wall_s"], "onnx": onnx, "ranks": test["ranks"]}
    out_valid = {**common, "split": "valid", "users": valid["users"], "metrics": valid["metrics"], "eval_wall_s": valid["wall_s"],
                 "ranks": valid["ranks"]}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    a.out.with_name(a.out.stem + "_valid.json").write_text(json.dumps(out_valid, indent=1) + "\n", encoding="utf-8")
    log = a.checkpoint / sasrec.LOG_FILE
    if log.is_file():
        rows = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
        a.out.with_name(a.out.stem + "_train_log.jsonl").write_text(log.read_text(encoding="utf-8"), encoding="utf-8")
        _plot(rows, meta, a.out.with_name(a.out.stem + "_curve.png"))
    print(json.dumps({k: v for k, v in out.items() if k != "ranks"}, indent=1))


def _plot(rows: list[dict], meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    ev = [r for r in rows if "valid" in r]
    ax.plot([r["epoch"] for r in ev], [r["valid"]["NDCG@10"] for r in ev], label="valid NDCG@10")
    ax.plot([r["epoch"] for r in ev], [r["valid"]["HR@10"] for r in ev], label="valid HR@10")
    chosen = (meta.get("training") or {}).get("chosen_epoch")
    if chosen:
        ax.axvline(chosen, color="grey", ls=":", label=f"chosen epoch {chosen}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("metric (all users)")
    ax2 = ax.twinx()
    ax2.plot([r["epoch"] for r in rows], [r["loss"] for r in rows], color="k", alpha=0.4, label="train loss")
    ax2.set_ylabel("train cross-entropy")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="center right", fontsize=8)
    ax.set_title("SASRec on ml-100k loo-full")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
