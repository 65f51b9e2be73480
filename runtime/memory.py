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


#: ``mallopt``'s parameter number for the size from which glibc serves an allocation from its own mapping.
M_MMAP_THRESHOLD = -3
#: Allocations of this size and more get their own mapping (``map_large_allocations``). Below it they come from
#: the arenas: each new mapping is faulted in page by page and each unmapping interrupts the other threads' cores
#: (on a 362 M-parameter model 16 MiB took 4-7 % less time than 4 MiB, with the same peak).
LARGE_ALLOCATION_BYTES = 16 * 2**20


@functools.cache
def _glibc(name: str):
    """A glibc function by name, or None (another C library, another system)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), name)  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return None


def map_large_allocations() -> bool:
    """Have glibc serve allocations of ``LARGE_ALLOCATION_BYTES`` and more from their own mappings, handed back to
    the system as soon as they are freed; returns whether it could (glibc only). Process-wide and lasting.

    By default glibc raises that threshold to the size of each large block freed (up to 32 MiB), after which such
    blocks come from the arena of the thread that asked for them and stay resident there when freed. With the
    threads of a layer sweep (ONNX Runtime's, the statistics', the quantizer's) each temporary of a few MiB then
    stays resident in several arenas at once. Setting the threshold also stops that adjustment.
    """
    mallopt = _glibc("mallopt")
    return mallopt is not None and mallopt(M_MMAP_THRESHOLD, LARGE_ALLOCATION_BYTES) == 1


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system (glibc ``malloc_trim``; elsewhere nothing).

    glibc keeps what ONNX Runtime sessions and NumPy temporaries freed in its arenas, resident, where the next
    allocations may not fit it; a pass that follows a session's end would start with that memory still counted
    against the process. Nothing the program holds is touched.
    """
    trim = _glibc("malloc_trim")
    if trim is not None:
        trim(0)
