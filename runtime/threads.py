"""Threads of the libraries lowbit's own array work runs on, beside ONNX Runtime and lowbit's worker threads.

OpenBLAS's threads wait for one another at every call. Where every core is already busy (ONNX Runtime's
threads, lowbit's own worker threads that each call BLAS, other processes), a call split over several BLAS
threads waits for the slowest of them to be scheduled and can take longer than on one thread.
``one_blas_thread`` runs a block with every loaded BLAS on one thread: OpenBLAS splits a call's output among
its threads, so each element is computed the same way and the results are the same bits on one thread as
on several (``threadpoolctl`` sets the limit).

ONNX Runtime's threads spin for a while after each run, waiting for the next one: in a loop that runs a
session and then works on its outputs, they take the cores from that work. ``NO_SPINNING`` is the session
option that lets them sleep instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

#: ``SessionOptions.add_session_config_entry`` pair: the session's threads sleep between runs instead of spinning.
NO_SPINNING = ("session.intra_op.allow_spinning", "0")


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the block with every loaded BLAS library (NumPy's, SciPy's) on one thread (same results)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield
