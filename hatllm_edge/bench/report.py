"""The run's outputs: a plain-text table, the latency plot, bench.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def table(report: dict[str, Any]) -> str:
    """A plain-text table: one line per backend and workload."""
    head = (f"{'backend':<16} {'workload':<16} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'req/s':>7} {'users/s':>8} "
            f"{'tok/s':>8} {'runs':>5} {'n':>3}")
    lines = [head, "-" * len(head)]
    for run in report["backends"]:
        for r in run["results"]:
            lines.append(f"{run['name']:<16} {r['workload']:<16} {r['p50_ms']:>9.1f} {r['p95_ms']:>9.1f} {r['p99_ms']:>9.1f} "
                         f"{r['requests_per_s']:>7.2f} {r['users_per_s']:>8.1f} {r['tokens_per_s']:>8.0f} "
                         f"{r.get('runs', 0):>5.1f} {len(r['latencies_ms']):>3}")
    lines.append("")
    lines.append(f"{'backend':<16} {'load s':>7} {'size MB':>8} {'peak RSS MB':>12}")
    for run in report["backends"]:
        lines.append(f"{run['name']:<16} {run['load_s']:>7.2f} {run['size_mb']:>8.1f} {run['peak_rss_mb']:>12.0f}")
    if report.get("paired"):
        lines += ["", f"paired check: the contenders take turns request by request, {report['config']['paired_rounds']} rounds",
                  f"{'backend':<16} {'workload':<16} {'p50 ms':>9} {'p95 ms':>9}"]
        for run in report["paired"]:
            for r in run["results"]:
                lines.append(f"{run['name']:<16} {r['workload']:<16} {r['p50_ms']:>9.1f} {r['p95_ms']:>9.1f}")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> Path:
    """Latency distribution per backend, one panel per workload (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = [w["name"] for w in report["config"]["workloads"]]
    names = [r["name"] for r in report["backends"]]
    cols = 4
    rows = -(-len(workloads) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 0.35 * len(names) * rows + 1.5 * rows), squeeze=False)
    for ax, wname in zip(axes.flat, workloads):
        data = [next(r["latencies_ms"] for r in run["results"] if r["workload"] == wname) for run in report["backends"]]
        ax.boxplot(data, orientation="horizontal", widths=0.6, showfliers=True)
        ax.set_yticks(range(1, len(names) + 1), names, fontsize=7)
        ax.set_xscale("log")
        ax.set_title(wname, fontsize=9)
        ax.set_xlabel("latency per request (ms)", fontsize=7)
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(workloads):]:
        ax.axis("off")
    cfg = report["config"]
    fig.suptitle(f"hatllm-edge bench: {cfg['device']}, {cfg['threads']} threads", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ablation_table(rows: list[dict[str, Any]]) -> str:
    w = max(len("variant"), *(len(r["variant"]) for r in rows))
    lines = [f"{'variant':<{w}} {'p50 ms':>9} {'x shipped':>10} {'max |score diff|':>17}"]
    lines += [f"{r['variant']:<{w}} {r['p50_ms']:>9.1f} {r['vs_shipped']:>10.2f} {r['max_score_diff']:>17.2g}" for r in rows]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "bench.json"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    return json_path, plot(report, out_dir / "bench.png")
