"""Streaming calibration statistics equal their one-shot values, in memory independent of the data."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lowbit.passes.quant.hessian import HessianAccumulator


@settings(max_examples=50, deadline=None)
@given(
    data=hnp.arrays(np.int64, st.tuples(st.integers(1, 40), st.integers(1, 6)), elements=st.integers(-1000, 1000)),
    cuts=st.lists(st.integers(0, 40), max_size=6),
)
def test_streamed_statistics_equal_one_shot(data, cuts):
    """Integer-valued activations make every float64 sum exact, so any chunking must agree bit for bit."""
    inputs = data.astype(np.float32)
    accumulator = HessianAccumulator(inputs.shape[1])
    for chunk in np.split(inputs, sorted(cut % (len(inputs) + 1) for cut in cuts)):
        accumulator.update(chunk)
    exact = data.astype(np.float64)
    np.testing.assert_array_equal(accumulator.hessian, exact.T @ exact)
    np.testing.assert_array_equal(accumulator.abs_max, np.abs(exact).max(axis=0))
    np.testing.assert_array_equal(accumulator.mean_abs, np.abs(exact).sum(axis=0) / len(exact))
    assert accumulator.tokens == len(exact)


def test_leading_axes_are_tokens_and_float32_is_accumulated_in_float64():
    rng = np.random.default_rng(0)
    batch = (1.0 + rng.random((3, 500, 8)) * 1e-3).astype(np.float32)
    accumulator = HessianAccumulator(8)
    accumulator.update(batch)
    flat = batch.reshape(-1, 8).astype(np.float64)
    assert accumulator.tokens == 1500
    np.testing.assert_allclose(accumulator.hessian, flat.T @ flat, rtol=1e-13)
    assert accumulator.hessian.dtype == np.float64


def test_memory_does_not_grow_with_updates():
    accumulator = HessianAccumulator(16)

    def footprint() -> int:
        return sum(a.nbytes for a in vars(accumulator).values() if isinstance(a, np.ndarray))

    before = footprint()
    rng = np.random.default_rng(1)
    for _ in range(50):
        accumulator.update(rng.standard_normal((32, 16)))
    assert footprint() == before


def test_empty_batch_and_fresh_accumulator():
    accumulator = HessianAccumulator(4)
    accumulator.update(np.zeros((0, 4)))
    assert accumulator.tokens == 0
    np.testing.assert_array_equal(accumulator.mean_abs, np.zeros(4))
    np.testing.assert_array_equal(accumulator.hessian, np.zeros((4, 4)))


@pytest.mark.parametrize("batch", [np.zeros((3, 5)), np.zeros(3), np.full((2, 4), np.nan)])
def test_rejects_bad_batches(batch):
    with pytest.raises(ValueError):
        HessianAccumulator(4).update(batch)


@settings(max_examples=30, deadline=None)
@given(data=hnp.arrays(np.int64, st.tuples(st.integers(2, 30), st.integers(1, 7)), elements=st.integers(-1000, 1000)))
def test_reading_between_updates_gives_the_symmetric_sum_so_far(data):
    """Updates add to one triangle and reads mirror it: a read between updates must not go stale or
    double-count."""
    accumulator = HessianAccumulator(data.shape[1])
    exact = data.astype(np.float64)
    for end in range(1, len(data) + 1):
        accumulator.update(data[end - 1 : end].astype(np.float32))
        np.testing.assert_array_equal(accumulator.hessian, exact[:end].T @ exact[:end])


def test_assigned_hessian_is_kept_and_further_updates_add_to_it():
    accumulator = HessianAccumulator(3)
    start = np.array([[4.0, 1.0, 2.0], [1.0, 5.0, 0.0], [2.0, 0.0, 6.0]])
    accumulator.hessian = start
    np.testing.assert_array_equal(accumulator.hessian, start)
    accumulator.update(np.array([[1.0, 2.0, 3.0]]))
    np.testing.assert_array_equal(accumulator.hessian, start + np.outer([1, 2, 3], [1, 2, 3]))
    with pytest.raises(ValueError, match=r"must be \[3, 3\]"):
        accumulator.hessian = np.zeros((2, 2))
