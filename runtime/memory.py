"""This process's peak resident memory, for reports and benchmarks."""

from __future__ import annotations

import resource
import sys


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark of this process's own memory. Not
    ``getrusage``'s ``ru_maxrss``, which Linux carries across ``execve``: a benchmark row measured in a
    subprocess would report its large parent's peak at the fork. Elsewhere ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux
