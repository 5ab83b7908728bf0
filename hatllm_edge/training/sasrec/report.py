"""The results files of a SASRec checkpoint: validation and test metrics, the ONNX export checked on test, the training curve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hatllm_edge.ranking.assistant import read_config
from hatllm_edge.training.sasrec.checkpoint import LOG_FILE
from hatllm_edge.training.sasrec.evaluate import evaluate_checkpoint
from hatllm_edge.training.sasrec.onnx import export_checkpoint_onnx

RANKS_NOTE = "0-based rank of the target among all catalog items (history not removed; ties by catalog order)"


def report(
    folder: Path, out: Path, dataset: str = "ml-100k", interactions: Path | None = None, items: Path | None = None,
    threads: int | None = None, command: str | None = None,
) -> dict[str, Any]:
    """The results of a trained checkpoint, in one go: validation and test on PyTorch, the ONNX
    export (``<folder>/sasrec.onnx``) checked against PyTorch, and test on ONNX Runtime (its
    metrics and how many users get the same rank). Writes ``out`` (test, readable by
    :func:`hatllm_edge.core.metrics.compare_runs`), ``<out stem>_valid.json`` beside it and, when the
    checkpoint has a training log, ``<out stem>_train_log.jsonl`` and ``<out stem>_curve.png``.
    Returns what ``out`` holds."""
    folder, out = Path(folder), Path(out)
    meta = read_config(folder)
    data_args = (dataset, interactions, items)
    valid = evaluate_checkpoint(folder, "valid", *data_args, threads=threads)
    test = evaluate_checkpoint(folder, "test", *data_args, threads=threads)
    onnx = export_checkpoint_onnx(folder)
    test_ort = evaluate_checkpoint(folder, "test", *data_args, backend="onnx", threads=threads)
    same = sum(test_ort["ranks"][u] == r for u, r in test["ranks"].items())
    onnx.update(test_metrics=test_ort["metrics"], test_same_rank_users=same, test_users=test["users"], test_wall_s=test_ort["wall_s"])
    common = {"model": "sasrec", "checkpoint": str(folder), "config": meta["model"], "train_config": meta.get("train_config"),
              "training": meta.get("training"), "train_command": meta.get("command"), "command": command, "ranks_note": RANKS_NOTE}
    result = {**common, "split": "test", "users": test["users"], "metrics": test["metrics"],
              "valid_metrics": valid["metrics"], "eval_wall_s": test["wall_s"], "onnx": onnx, "ranks": test["ranks"]}
    result_valid = {**common, "split": "valid", "users": valid["users"], "metrics": valid["metrics"], "eval_wall_s": valid["wall_s"],
                    "ranks": valid["ranks"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    out.with_name(out.stem + "_valid.json").write_text(json.dumps(result_valid, indent=1) + "\n", encoding="utf-8")
    log = folder / LOG_FILE
    if log.is_file():
        text = log.read_text(encoding="utf-8")
        out.with_name(out.stem + "_train_log.jsonl").write_text(text, encoding="utf-8")
        plot_training([json.loads(line) for line in text.splitlines() if line.strip()], meta, out.with_name(out.stem + "_curve.png"))
    return result


def plot_training(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> Path:
    """The learning curve from ``train_log.jsonl`` rows: validation NDCG@10 and HR@10 per
    evaluated epoch, the chosen epoch, and the training loss on a second axis."""
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
    ax.set_title(f"SASRec on {meta.get('dataset', 'ml-100k')} loo-full")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
