"""What machine and software a figure came from, and what it cost in memory: recorded beside
every speed and cost figure, since the CPU differs between hosts (AMX or not) and figures from
different hosts do not compare."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
import resource
import subprocess
import sys
from importlib import metadata
from pathlib import Path


def _cpuinfo(key: str) -> str | None:
    """The first /proc/cpuinfo line's value for ``key``; None where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU model (lscpu's "Model name"); the architecture where /proc/cpuinfo has none."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo "flags"); empty where there is no such file."""
    return set((_cpuinfo("flags") or "").split())


_SYS_ARCH_PRCTL, _ARCH_GET_XCOMP_PERM, _XTILEDATA = 158, 0x1022, 1 << 18  # x86-64 Linux


def amx_tiles_granted() -> bool | None:
    """Whether this process holds the kernel's permission to use AMX tile data. A library asks
    for it only when it sets up an AMX kernel (ONNX Runtime's MLAS for its u8 x s8 GEMM as the
    library loads, oneDNN for bf16 and int8), so afterwards True says one was set up and False
    that none was. None where it cannot be asked (not x86-64 Linux, or a kernel before 5.16)."""
    libc = _libc()
    if libc is None or platform.machine() != "x86_64":
        return None
    syscall = libc.syscall
    syscall.restype, syscall.argtypes = ctypes.c_long, [ctypes.c_long, ctypes.c_long, ctypes.c_void_p]
    mask = ctypes.c_uint64(0)
    if syscall(_SYS_ARCH_PRCTL, _ARCH_GET_XCOMP_PERM, ctypes.byref(mask)) != 0:
        return None
    return bool(mask.value & _XTILEDATA)


def onnxruntime_sets_up_amx() -> bool | None:
    """Whether ONNX Runtime, loaded alone in a fresh process, sets up its AMX int8 GEMM here
    (:func:`amx_tiles_granted` after the import; in this process torch may hold the grant
    already). None where it cannot be told."""
    code = ("import onnxruntime\n"
            "from hatllm_edge.core.machine import amx_tiles_granted\n"
            "print(amx_tiles_granted())")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"True": True, "False": False}.get(out.strip())


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


def rss_mib() -> float | None:
    """This process's resident memory now (VmRSS), MiB; None where /proc is absent."""
    return _proc_mib("/proc/self/status", "VmRSS")


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


def release_free_memory() -> None:
    """Hand the C allocator's free memory back to the kernel (glibc ``malloc_trim``; elsewhere
    a no-op)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class HeapTrim:
    """Hands freed memory back (:func:`release_free_memory`) once the resident memory has grown
    by more than ``growth`` since the first measurement after the last hand-back (``growth``
    <= 0: at every step).

    Each training step allocates activations of another shape; glibc keeps what they freed,
    fragmented, so without this a run's resident memory grew from 8.5 to 11.7 GB over its first
    20 steps and to 17-19 GB by its end, twice what one step needs. Handing back after every
    step holds it at one step's need but costs about a fifth of the step time (the next step
    faults its pages in again); on growth it happens every dozen steps or so."""

    def __init__(self, growth: float = 0.25) -> None:
        self.growth = growth
        self.reference: float | None = None

    def step(self) -> bool:
        """Call after each step; returns whether memory was handed back."""
        if self.growth <= 0:
            release_free_memory()
            return True
        now = rss_mib()
        if now is None:
            return False
        if self.reference is None:
            self.reference = now
            return False
        if now <= self.reference * (1 + self.growth):
            return False
        release_free_memory()
        self.reference = None
        return True


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None
