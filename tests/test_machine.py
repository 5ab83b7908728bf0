"""The machine figures and the memory hand-back the trainer relies on."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from hatllm_edge.core.machine import (
    cpu_flags,
    onnxruntime_sets_up_amx,
    peak_rss_mib,
    release_free_memory,
    reset_peak_rss,
    rss_mib,
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and glibc's malloc_trim are Linux's")
def test_freed_heap_memory_goes_back_to_the_kernel() -> None:
    """Small blocks freed below a live one stay resident in glibc's heap (what made training runs
    grow step after step); release_free_memory hands them back."""
    blocks = [bytearray(100_000) for _ in range(4000)]  # 400 MB in heap-sized blocks, touched
    kept = blocks[-1]  # the heap's top stays in use, so free() alone cannot shrink it
    reset_peak_rss()
    before = rss_mib()
    del blocks
    freed = rss_mib()
    release_free_memory()
    after = rss_mib()
    assert kept and before is not None and freed is not None and after is not None
    assert before - freed < 100, "free() alone already returned the blocks; the test no longer shows the problem"
    assert freed - after > 300
    assert peak_rss_mib() >= before - 1


def test_heap_trim_hands_back_once_memory_grew_past_its_share(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read after each step: the first reading is the reference; one more than 25% above it hands
    memory back, and the reading after the next step (its pages faulted in again) is the new one."""
    import hatllm_edge.core.machine as machine

    readings = iter([8000.0, 9000.0, 10000.0, 10001.0, 8100.0, 9900.0, 10100.0, 10200.0])
    released: list[int] = []
    monkeypatch.setattr(machine, "rss_mib", lambda: next(readings))
    monkeypatch.setattr(machine, "release_free_memory", lambda: released.append(1))
    heap = machine.HeapTrim(growth=0.25)
    assert [heap.step() for _ in range(8)] == [False, False, False, True, False, False, False, True]
    assert len(released) == 2
    every = machine.HeapTrim(growth=0)
    assert [every.step() for _ in range(3)] == [True, True, True] and len(released) == 5


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.machine() != "x86_64",
                    reason="the tile permission is an x86-64 Linux request")
def test_onnx_runtime_asks_for_amx_tiles_exactly_where_the_cpu_has_them() -> None:
    """A bare interpreter holds no grant; one that has loaded ONNX Runtime holds it where the CPU
    has AMX (its MLAS sets up the AMX u8 x s8 GEMM) and not elsewhere. Fresh processes, since
    torch in this one may hold the grant already. What bench and matmul_kernels report."""
    bare = subprocess.run([sys.executable, "-c", "from hatllm_edge.core.machine import amx_tiles_granted as g; print(g())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    if bare == "None":
        pytest.skip("this kernel does not answer ARCH_GET_XCOMP_PERM (before 5.16)")
    assert bare == "False"
    assert onnxruntime_sets_up_amx() is ("amx_int8" in cpu_flags())
    assert "fpu" in cpu_flags()  # the flags line was read, not some other line
