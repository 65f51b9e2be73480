"""runtime.memory.peak_rss_mb: the peak of this process, not of the parent that started it."""

import subprocess
import sys

import numpy as np

from lowbit.runtime.memory import peak_rss_mb

CHILD = "from lowbit.runtime.memory import peak_rss_mb; print(peak_rss_mb())"


def test_a_subprocess_reports_its_own_peak_not_its_parents():
    ballast = np.ones(400 * 2**20 // 8)  # 400 MiB, touched
    parent = peak_rss_mb()
    assert parent > 400
    child = float(subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout)
    assert 0 < child < parent - 300  # getrusage's ru_maxrss would report at least the parent's peak here
    del ballast
