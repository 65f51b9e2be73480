"""runtime.memory: peak_rss_mb is the peak of this process, not of the parent that started it;
release_free_memory hands freed heap pages back; map_large_allocations gives large blocks their own mappings."""

import ctypes
import subprocess
import sys

import numpy as np
import pytest

from lowbit.runtime.memory import LARGE_ALLOCATION_BYTES, peak_rss_mb, release_free_memory

CHILD = "from lowbit.runtime.memory import peak_rss_mb; print(peak_rss_mb())"


def test_a_subprocess_reports_its_own_peak_not_its_parents():
    ballast = np.ones(400 * 2**20 // 8)  # 400 MiB, touched
    parent = peak_rss_mb()
    assert parent > 400
    child = float(subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout)
    assert 0 < child < parent - 300  # getrusage's ru_maxrss would report at least the parent's peak here
    del ballast


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))


def test_release_free_memory_returns_freed_heap_pages():
    """Small blocks (glibc's heap, not mmap) freed around one that is kept stay resident until trimmed."""
    if not sys.platform.startswith("linux"):
        release_free_memory()  # nothing to hand back elsewhere: it must still run
        return
    blocks = [bytearray(64 * 1024) for _ in range(3200)]  # 200 MiB in heap-sized pieces, touched
    kept = blocks[-1]
    del blocks
    before = _rss_mb()
    release_free_memory()
    assert _rss_mb() < before - 100
    del kept


MAPPED_AFTER_A_LARGE_FREE = """
import ctypes, sys
import numpy as np
from lowbit.runtime.memory import LARGE_ALLOCATION_BYTES, map_large_allocations

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "set":
    assert map_large_allocations()
freed = np.ones(LARGE_ALLOCATION_BYTES * 3 // 2 // 8)
del freed  # by default glibc now serves blocks up to that size from its arenas
before = libc.mallinfo2().hblkhd
block = np.ones(LARGE_ALLOCATION_BYTES * 5 // 4 // 8)
print((libc.mallinfo2().hblkhd - before) / LARGE_ALLOCATION_BYTES)
"""


def test_map_large_allocations_keeps_large_blocks_in_their_own_mappings():
    """After a block of 1.5x ``LARGE_ALLOCATION_BYTES`` is freed, glibc's default serves a block of 1.25x from its
    arena (where it stays resident once freed); with ``map_large_allocations`` it gets its own mapping. In child
    processes: the setting lasts. (glibc raises its threshold up to 32 MiB, so 1.5x must stay under that.)"""
    assert LARGE_ALLOCATION_BYTES * 3 // 2 <= 32 * 2**20
    if not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("glibc 2.33 or newer only (mallinfo2)")

    def mapped_thresholds(mode: str) -> float:
        run = subprocess.run([sys.executable, "-c", MAPPED_AFTER_A_LARGE_FREE, mode], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return float(run.stdout)

    assert mapped_thresholds("default") == 0
    assert mapped_thresholds("set") >= 1.25
