"""BLAS on one thread: the limit holds inside the block only, and the results are the same bits."""

from __future__ import annotations

import numpy as np
import threadpoolctl
from scipy.linalg import blas

from lowbit.runtime.threads import one_blas_thread


def _products(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A symmetric rank-k update and a matrix product large enough for OpenBLAS to split over its threads."""
    tokens = rng.standard_normal((256, 384))
    weight = rng.standard_normal((384, 320)).astype(np.float32)
    return blas.dsyrk(1.0, tokens.T, trans=0, lower=0), tokens.astype(np.float32) @ weight


def test_results_are_the_same_bits_on_one_blas_thread():
    threaded = _products(np.random.default_rng(0))
    with one_blas_thread():
        single = _products(np.random.default_rng(0))
    for got, expected in zip(single, threaded):
        np.testing.assert_array_equal(got, expected)


def test_the_limit_holds_inside_the_block_only():
    def blas_threads() -> list[int]:
        return [info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]

    before = blas_threads()
    assert before  # NumPy's and SciPy's BLAS are loaded
    with one_blas_thread():
        assert set(blas_threads()) <= {1}
    assert blas_threads() == before
