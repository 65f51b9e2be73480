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


def test_float32_products_of_one_update_are_summed_in_float32_and_updates_in_float64():
    """2^24 + 1 is not a float32: within one update (and ``FLOAT32_ROWS`` rows) it rounds, across updates or
    across row chunks it does not."""
    rows = np.array([[4096.0], [1.0]], dtype=np.float32)  # squares 2^24 and 1
    one_update = HessianAccumulator(1)
    one_update.update(rows)
    assert one_update.hessian[0, 0] == 2.0**24
    two_updates = HessianAccumulator(1)
    two_updates.update(rows[:1])
    two_updates.update(rows[1:])
    assert two_updates.hessian[0, 0] == 2.0**24 + 1
    float64_rows = HessianAccumulator(1)
    float64_rows.update(rows.astype(np.float64))
    assert float64_rows.hessian[0, 0] == 2.0**24 + 1


def test_long_float32_updates_are_summed_in_chunks(monkeypatch):
    monkeypatch.setattr(hessian, "FLOAT32_ROWS", 1)
    accumulator = HessianAccumulator(1)
    accumulator.update(np.array([[4096.0], [1.0]], dtype=np.float32))
    assert accumulator.hessian[0, 0] == 2.0**24 + 1


def test_float32_magnitudes_equal_their_float64_values_bit_for_bit():
    """|x| and its maximum are taken in the activations' float32 and the sum accumulated in float64: the same
    bits as taking all of them in float64 (H, from float32 products, to float32 round-off)."""
    rng = np.random.default_rng(3)
    batches = [(rng.standard_normal((2, 97, 24)) * rng.uniform(0.1, 40, 24)).astype(np.float32) for _ in range(5)]
    accumulator = HessianAccumulator(24)
    reference = HessianAccumulator(24)
    for batch in batches:
        accumulator.update(batch)
        reference.update(batch.astype(np.float64))
    np.testing.assert_array_equal(accumulator.abs_max, reference.abs_max)
    np.testing.assert_array_equal(accumulator.abs_sum, reference.abs_sum)
    # float32 products: each entry within float32 round-off of the largest (entries that cancel lose relative digits)
    np.testing.assert_allclose(
        accumulator.hessian, reference.hessian, rtol=0, atol=1e-6 * np.abs(reference.hessian).max()
    )
    flat = np.concatenate([batch.reshape(-1, 24) for batch in batches]).astype(np.float64)
    np.testing.assert_array_equal(accumulator.abs_max, np.abs(flat).max(axis=0))


def test_integer_activations_do_not_overflow_in_the_magnitudes():
    accumulator = HessianAccumulator(2)
    accumulator.update(np.array([[-128, 5]], dtype=np.int8))
    np.testing.assert_array_equal(accumulator.abs_max, [128.0, 5.0])
    np.testing.assert_array_equal(accumulator.hessian, [[16384.0, -640.0], [-640.0, 25.0]])


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
