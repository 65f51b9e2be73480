"""runtime.memory: peak_rss_mb is the peak of this process, not of the parent that started it;
release_free_memory hands freed heap pages back."""

import subprocess
import sys

import numpy as np

from lowbit.runtime.memory import peak_rss_mb, release_free_memory

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
