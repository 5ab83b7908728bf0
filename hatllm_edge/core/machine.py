"""What machine and software a figure came from, and what it cost in memory: recorded beside
every speed and cost figure, since the CPU differs between hosts (AMX or not) and figures from
different hosts do not compare."""

from __future__ import annotations

import platform
import resource
from importlib import metadata
from pathlib import Path


def cpu_name() -> str:
    """The CPU model (lscpu's "Model name"); the architecture where /proc/cpuinfo has none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions(names: tuple[str, ...] = ("onnx", "onnxruntime", "onnxruntime-gpu", "torch", "transformers", "bitsandbytes")
             ) -> dict[str, str]:
    """Installed version of each of ``names`` that is installed."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _proc_mib(path: str, key: str) -> float | None:
    """A ``key: N kB`` line of a /proc file, in MiB; None where there is none (not Linux)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """This process's peak resident memory (MiB) since it started or since
    :func:`reset_peak_rss`: the kernel's high-water mark, VmHWM (ru_maxrss where /proc is absent)."""
    peak = _proc_mib("/proc/self/status", "VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def available_mib() -> float | None:
    """Memory the kernel could give a new process now (MemAvailable), MiB; None where unknown."""
    return _proc_mib("/proc/meminfo", "MemAvailable")


def reset_peak_rss() -> None:
    """Start :func:`peak_rss_mib` again from the current RSS (Linux; elsewhere a no-op, and the
    peak is the process's so far)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
