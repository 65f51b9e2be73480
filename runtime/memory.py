"""This process's peak resident memory, for reports and benchmarks, and handing freed memory back."""

from __future__ import annotations

import ctypes
import functools
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


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library, another system)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system (glibc ``malloc_trim``; elsewhere nothing).

    glibc keeps what ONNX Runtime sessions and NumPy temporaries freed in its arenas, resident, where the next
    allocations may not fit it; a pass that follows a session's end would start with that memory still counted
    against the process. Nothing the program holds is touched.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
