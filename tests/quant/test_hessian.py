"""Streaming calibration statistics equal their one-shot values, in memory independent of the data."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lowbit.passes.quant import hessian
from lowbit.passes.quant.hessian import HessianAccumulator


@settings(max_examples=50, deadline=None)
@given(
    data=hnp.arrays(np.int64, st.tuples(st.integers(1, 40), st.integers(1, 6)), elements=st.integers(-64, 64)),
    cuts=st.lists(st.integers(0, 40), max_size=6),
)
def test_streamed_statistics_equal_one_shot(data, cuts):
    """Small integer-valued activations make every sum exact (in float32 too: 40 products of at most 64^2 stay
    under 2^24), so any chunking must agree bit for bit."""
    inputs = data.astype(np.float32)
    accumulator = HessianAccumulator(inputs.shape[1])
    for chunk in np.split(inputs, sorted(cut % (len(inputs) + 1) for cut in cuts)):
        accumulator.update(chunk)
    exact = data.astype(np.float64)
    np.testing.assert_array_equal(accumulator.hessian, exact.T @ exact)
    np.testing.assert_array_equal(accumulator.abs_max, np.abs(exact).max(axis=0))
    np.testing.assert_array_equal(accumulator.mean_abs, np.abs(exact).sum(axis=0) / len(exact))
    assert accumulator.tokens == len(exact)


def test_leading_axes_are_tokens_and_float32_products_are_summed_to_float32_accuracy():
    rng = np.random.default_rng(0)
    batch = (1.0 + rng.random((3, 500, 8)) * 1e-3).astype(np.float32)
    accumulator = HessianAccumulator(8)
    accumulator.update(batch)
    flat = batch.reshape(-1, 8).astype(np.float64)
    assert accumulator.tokens == 1500
    np.testing.assert_allclose(accumulator.hessian, flat.T @ flat, rtol=1e-5)
    assert accumulator.hessian.dtype == np.float64


def test_float32_products_are_summed_in_float32_up_to_float32_rows_across_updates_and_in_float64_beyond(monkeypatch):
    """2^24 + 1 is not a float32: within ``FLOAT32_ROWS`` rows it rounds, whether the rows come in one update or in
    several; rows on either side of a ``FLOAT32_ROWS`` boundary, or a read of H, are summed in float64."""
    rows = np.array([[4096.0], [1.0]], dtype=np.float32)  # squares 2^24 and 1
    one_update = HessianAccumulator(1)
    one_update.update(rows)
    assert one_update.hessian[0, 0] == 2.0**24
    two_updates = HessianAccumulator(1)
    two_updates.update(rows[:1])
    two_updates.update(rows[1:])
    assert two_updates.hessian[0, 0] == 2.0**24
    read_between = HessianAccumulator(1)
    read_between.update(rows[:1])
    assert read_between.hessian[0, 0] == 2.0**24
    read_between.update(rows[1:])
    assert read_between.hessian[0, 0] == 2.0**24 + 1
    float64_rows = HessianAccumulator(1)
    float64_rows.update(rows.astype(np.float64))
    assert float64_rows.hessian[0, 0] == 2.0**24 + 1
    monkeypatch.setattr(hessian, "FLOAT32_ROWS", 1)
    for updates in ([rows], [rows[:1], rows[1:]]):
        accumulator = HessianAccumulator(1)
        for update in updates:
            accumulator.update(update)
        assert accumulator.hessian[0, 0] == 2.0**24 + 1


def test_float32_sums_start_at_every_float32_rows_boundary_of_the_stream(monkeypatch):
    """Where the float32 sums end depends on the stream of rows, not on how it is split into updates: with sums
    of 3 rows, [a, 0, 1 | a, 0, 0 | 1] (a^2 = 2^24) rounds the first 1 away and keeps the last, however the seven
    rows arrive (each sum has at most two nonzero terms, so the order within it does not matter)."""
    monkeypatch.setattr(hessian, "FLOAT32_ROWS", 3)
    rows = np.array([[4096.0], [0.0], [1.0], [4096.0], [0.0], [0.0], [1.0]], dtype=np.float32)
    for cuts in ([], [1], [2, 3], [1, 2, 3, 4, 5, 6], [4], [3, 6]):
        accumulator = HessianAccumulator(1)
        for chunk in np.split(rows, cuts):
            accumulator.update(chunk)
        assert accumulator.hessian[0, 0] == 2.0**25 + 1, cuts


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_memory_does_not_grow_with_updates(monkeypatch, dtype):
    """Constant memory over any number of updates (float32: one float32 sum ``[K, K]`` besides H, reused across
    ``FLOAT32_ROWS`` boundaries and let go when H is read)."""
    monkeypatch.setattr(hessian, "FLOAT32_ROWS", 64)
    accumulator = HessianAccumulator(16)

    def footprint() -> int:
        return sum(a.nbytes for a in vars(accumulator).values() if isinstance(a, np.ndarray))

    rng = np.random.default_rng(1)
    accumulator.update(rng.standard_normal((32, 16)).astype(dtype))
    after_one = footprint()
    for _ in range(50):
        accumulator.update(rng.standard_normal((32, 16)).astype(dtype))
    assert footprint() == after_one
    _ = accumulator.hessian
    assert footprint() == after_one - (16 * 16 * 4 if dtype == np.float32 else 0)


def test_empty_batch_and_fresh_accumulator():
    accumulator = HessianAccumulator(4)
    accumulator.update(np.zeros((0, 4)))
    assert accumulator.tokens == 0
    np.testing.assert_array_equal(accumulator.mean_abs, np.zeros(4))
    np.testing.assert_array_equal(accumulator.hessian, np.zeros((4, 4)))


@pytest.mark.parametrize("batch", [np.zeros((3, 5)), np.zeros(3)])
def test_rejects_batches_of_the_wrong_shape(batch):
    with pytest.raises(ValueError, match="expected activations"):
        HessianAccumulator(4).update(batch)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_rejects_nan_or_inf_anywhere_and_keeps_the_statistics_so_far(bad, dtype):
    accumulator = HessianAccumulator(4)
    good = np.arange(8, dtype=dtype).reshape(2, 4)
    accumulator.update(good)
    before = (accumulator.hessian.copy(), accumulator.abs_max.copy(), accumulator.abs_sum.copy(), accumulator.tokens)
    batch = np.ones((3, 4), dtype=dtype)
    batch[2, 1] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        accumulator.update(batch)
    after = (accumulator.hessian, accumulator.abs_max, accumulator.abs_sum, accumulator.tokens)
    for kept, now in zip(before, after):
        np.testing.assert_array_equal(now, kept)


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


def test_released_hessian_cannot_be_read_or_updated_and_the_magnitudes_stay():
    acc = HessianAccumulator(3)
    acc.update(np.array([[1.0, -2.0, 3.0]]))
    acc.release()
    with pytest.raises(RuntimeError, match="released"):
        _ = acc.hessian
    with pytest.raises(RuntimeError, match="released"):
        acc.update(np.ones((1, 3)))
    np.testing.assert_array_equal(acc.abs_max, [1.0, 2.0, 3.0])
    assert acc.tokens == 1


@pytest.mark.parametrize("channels", [1, 2, 255, 256, 257, 600])
@pytest.mark.parametrize("order", ["C", "F"])
def test_mirror_copies_the_upper_triangle_onto_the_lower(channels, order):
    matrix = np.asarray(np.random.default_rng(channels).standard_normal((channels, channels)), order=order)
    upper = np.triu(matrix)
    hessian._mirror_upper_triangle(matrix)
    np.testing.assert_array_equal(matrix, upper + np.triu(upper, 1).T)


@settings(max_examples=50, deadline=None)
@given(
    data=hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 40), st.integers(1, 6)),
        elements=st.floats(-1e3, 1e3, width=32, allow_subnormal=False),
    ),
    cuts=st.lists(st.integers(0, 40), max_size=6),
)
def test_a_diagonal_only_accumulator_sums_the_exact_squares_and_keeps_no_matrix(data, cuts):
    """``diagonal_only``: ``diag(H)`` is the float64 sum of the float32 activations' exact squares, whatever the
    chunking (to float64 round-off), with the magnitudes of a full accumulator and no ``[K, K]`` matrix."""
    full, diagonal = HessianAccumulator(data.shape[1]), HessianAccumulator(data.shape[1], diagonal_only=True)
    for chunk in np.split(data, sorted(cut % (len(data) + 1) for cut in cuts)):
        full.update(chunk)
        diagonal.update(chunk)
    exact = data.astype(np.float64)
    np.testing.assert_allclose(diagonal.diagonal, (exact**2).sum(axis=0), rtol=1e-13, atol=1e-300)
    np.testing.assert_allclose(full.diagonal, diagonal.diagonal, rtol=1e-5, atol=1e-6 * float((exact**2).max()))
    np.testing.assert_array_equal(diagonal.abs_max, full.abs_max)
    np.testing.assert_array_equal(diagonal.abs_sum, full.abs_sum)
    assert diagonal.tokens == full.tokens and diagonal._matrix is None and diagonal._pending is None


def test_a_diagonal_only_accumulator_refuses_to_give_h():
    accumulator = HessianAccumulator(3, diagonal_only=True)
    accumulator.update(np.array([[1.0, -2.0, 3.0]], np.float32))
    np.testing.assert_array_equal(accumulator.diagonal, [1.0, 4.0, 9.0])
    with pytest.raises(ValueError, match=r"only the diagonal of H was collected for these 3 channels"):
        _ = accumulator.hessian
