"""The run's outputs: a plain-text table, the latency plot, bench.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def machine_line(machine: dict[str, Any]) -> str:
    """Where the figures come from: they compare only within one machine, and AMX (or its
    absence) decides which backend leads (docs/results.md, "On an Intel CPU with AMX")."""
    ort = {True: ", ONNX Runtime's int8 GEMM on it", False: ", not used by ONNX Runtime"}.get(machine.get("onnxruntime_amx"), "")
    amx = f"AMX{ort}" if machine.get("amx") else "no AMX"
    return f"machine: {machine.get('cpu', 'unknown CPU')}, {machine.get('cpus', '?')} CPUs, {amx}"


def table(report: dict[str, Any]) -> str:
    """A plain-text table: one line per backend and workload."""
    head = (f"{'backend':<16} {'workload':<16} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'req/s':>7} {'users/s':>8} "
            f"{'tok/s':>8} {'runs':>5} {'n':>3}")
    lines = [machine_line(report.get("machine", {})), head, "-" * len(head)]
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
    """What the run found, at a glance: per workload, each engine backend's speed-up over each
    PyTorch reference (one panel per reference; bars labelled with the speed-up and the
    backend's p50), then every backend's p50 with its p5-p95 range. Without a PyTorch
    backend in the run, only the latency panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    workloads = [w["name"] for w in report["config"]["workloads"]]
    runs = {run["name"]: {r["workload"]: r for r in run["results"]} for run in report["backends"]}
    refs = [n for n in ("torch-fp32", "torch-bf16") if n in runs]  # the references the targets name
    engines = [n for n in runs if not n.startswith("torch-")] or list(runs)
    colours = dict(zip(list(runs), plt.get_cmap("tab10").colors))
    height = max(2.6, 1.2 + 0.2 * len(workloads) * max(1, len(engines)))
    fig, axes = plt.subplots(1, len(refs) + 1, figsize=(4.4 * (len(refs) + 1), height), squeeze=False, sharey=True)
    y = np.arange(len(workloads))
    bar = 0.8 / max(1, len(engines))
    for ax, ref in zip(axes[0], refs):
        for k, name in enumerate(engines):
            p50 = np.array([runs[name][w]["p50_ms"] for w in workloads])
            speedup = np.array([runs[ref][w]["p50_ms"] for w in workloads]) / p50
            pos = y + (k - (len(engines) - 1) / 2) * bar
            ax.barh(pos, speedup, height=bar * 0.9, color=colours[name], label=name)
            for yy, x, ms in zip(pos, speedup, p50):
                ax.text(x, yy, f" x{x:.1f} ({ms:.0f} ms)", va="center", fontsize=6)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_xlim(0, ax.get_xlim()[1] * 1.35)  # room for the labels
        ax.set_title(f"speed-up over {ref} (p50)", fontsize=9)
        ax.set_xlabel(f"{ref} p50 / backend p50", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    ax = axes[0][-1]
    for k, name in enumerate(runs):
        res = [runs[name][w] for w in workloads]
        lat = [np.percentile(r["latencies_ms"], [5, 50, 95]) for r in res]
        pos = y + (k - (len(runs) - 1) / 2) * (0.8 / len(runs))
        ax.errorbar([q[1] for q in lat], pos, xerr=[[q[1] - q[0] for q in lat], [q[2] - q[1] for q in lat]], fmt="o", ms=3,
                    color=colours[name], label=name, elinewidth=1)
    ax.set_xscale("log")
    ax.set_title("latency per request: p50, p5-p95", fontsize=9)
    ax.set_xlabel("ms (log)", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(y, workloads, fontsize=7)
    axes[0][0].invert_yaxis()
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=7, frameon=False)
    cfg = report["config"]
    machine = report.get("machine", {})
    fig.suptitle(f"hatllm-edge bench: {cfg['device']}, {cfg['threads']} threads, {machine.get('cpu') or machine.get('processor', '')}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.45 / height, 1, 1 - 0.1 / height))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
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
