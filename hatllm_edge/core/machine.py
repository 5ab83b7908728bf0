"""What machine a figure came from: recorded beside every speed and cost figure, since the
CPU differs between hosts (AMX or not) and figures from different hosts do not compare."""

from __future__ import annotations

import platform
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
