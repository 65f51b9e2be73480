"""Codebook (k-means table) and binary-coded (BCQ) quantization: laws that hold for every weight (hypothesis) and edge cases."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lowbit.passes.quant.adadim import output_error
from lowbit.passes.quant.codebook import (
    CodebookWeight,
    fit_bcq,
    fit_codebook,
    fit_shared_table,
    gptq_onto_tables,
    quantize_gptq_codebook,
)
from lowbit.passes.quant.gptq import factor_hessian
from lowbit.passes.quant.rtn import quantize_rtn
from lowbit.passes.quant.scheme import QuantScheme

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
weights = st.integers(1, 19).flatmap(
    lambda k: st.integers(1, 19).flatmap(lambda n: arrays(np.float32, (k, n), elements=finite))
)
layouts = st.tuples(st.sampled_from([1, 2, 3, 4]), st.sampled_from([-1, 1, 3, 4, 7, 16]), st.sampled_from([0, 1]))


def weighted_error(weight, approx, channel_weights):
    return float(np.sum(channel_weights[:, None] * np.square(weight.astype(np.float64) - approx)))


def by_group(weight, block_size, axis, fit, channel_weights=None):
    """Each group's values (float64, with their rows' weights) replaced by ``fit(values, weights)``."""
    out = np.empty(weight.shape, np.float64)
    rows = np.broadcast_to(
        (np.ones(weight.shape[0]) if channel_weights is None else channel_weights)[:, None], weight.shape
    )
    length = weight.shape[axis]
    block_size = length if block_size < 1 else min(block_size, length)
    for start in range(0, length, block_size):
        cut = (
            (slice(start, start + block_size), slice(None))
            if axis == 0
            else (slice(None), slice(start, start + block_size))
        )
        part, part_rows = weight[cut].astype(np.float64), rows[cut]
        lines, line_rows = (part.T, part_rows.T) if axis == 0 else (part, part_rows)
        done = np.array([fit(line, line_weights) for line, line_weights in zip(lines, line_rows)])
        out[cut] = done.T if axis == 0 else done
    return out


def uniform_grid(weight, bits, block_size, axis):
    """Each group rounded to the nearest of 2**bits evenly spaced levels between its min and max."""

    def nearest_level(line, _):
        levels = np.linspace(line.min(), line.max(), 1 << bits)
        return levels[np.argmin(np.abs(line[:, None] - levels[None, :]), axis=1)]

    return by_group(weight, block_size, axis, nearest_level)


@settings(max_examples=200, deadline=None)
@given(weights, layouts, st.integers(0, 2**31 - 1))
def test_never_worse_than_the_uniform_grid_of_each_group(weight, layout, seed):
    bits, block_size, axis = layout
    channel_weights = np.random.default_rng(seed).uniform(0.0, 3.0, weight.shape[0])
    fitted = fit_codebook(weight, bits, block_size, axis, channel_weights)
    assert fitted.codes.dtype == np.uint8 and fitted.codes.shape == weight.shape
    assert int(fitted.codes.max()) < 1 << bits
    assert np.all(np.diff(fitted.tables, axis=-1) >= 0)
    ours = weighted_error(weight, fitted.dequantize(), channel_weights)
    grid = weighted_error(weight, uniform_grid(weight, bits, block_size, axis), channel_weights)
    assert ours <= grid * (1 + 1e-5) + 1e-6 * float(np.sum(np.square(weight, dtype=np.float64)))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), layouts, st.integers(0, 2**31 - 1))
def test_weights_already_on_a_table_come_back_exactly(k, n, layout, seed):
    bits, block_size, axis = layout
    rng = np.random.default_rng(seed)
    block = k if axis == 0 else n
    block = block if block_size < 1 else min(block_size, block)
    groups = -(-(k if axis == 0 else n) // block)
    shape = (groups, n, 1 << bits) if axis == 0 else (k, groups, 1 << bits)
    tables = np.sort(rng.normal(size=shape).astype(np.float32), axis=-1)
    codes = rng.integers(0, 1 << bits, (k, n)).astype(np.uint8)
    weight = CodebookWeight(codes, tables, bits, block, axis).dequantize()
    fitted = fit_codebook(weight, bits, block_size, axis)
    np.testing.assert_array_equal(fitted.dequantize(), weight)


def test_dequantize_looks_up_each_elements_group_table():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(13, 9)).astype(np.float32)
    for axis, block in [(0, 4), (1, 4), (0, 13), (1, 9)]:
        fitted = fit_codebook(weight, 2, block, axis)
        expected = np.empty(weight.shape, np.float32)
        for k in range(13):
            for n in range(9):
                table = fitted.tables[k // block, n] if axis == 0 else fitted.tables[k, n // block]
                expected[k, n] = table[fitted.codes[k, n]]
        np.testing.assert_array_equal(fitted.dequantize(), expected)


def test_codebook_beats_the_uniform_grid_on_heavy_tailed_weights():
    """Non-uniform levels pay off where values crowd near zero with a few far out (LLM weights)."""
    weight = np.random.default_rng(1).standard_t(3, size=(256, 64)).astype(np.float32)
    fitted = fit_codebook(weight, 3, -1, 0)
    ones = np.ones(256)
    assert weighted_error(weight, fitted.dequantize(), ones) < 0.5 * weighted_error(
        weight, uniform_grid(weight, 3, -1, 0), ones
    )


def test_channel_weights_pull_the_levels_towards_costly_channels():
    rng = np.random.default_rng(2)
    weight = rng.normal(size=(64, 8)).astype(np.float32)
    costly = np.ones(64)
    costly[:8] = 1000.0
    plain = fit_codebook(weight, 2, -1, 0)
    weighted = fit_codebook(weight, 2, -1, 0, costly)
    rows = slice(0, 8)
    assert np.sum(np.square(weight[rows] - weighted.dequantize()[rows])) < np.sum(
        np.square(weight[rows] - plain.dequantize()[rows])
    )


@pytest.mark.parametrize(
    ("weight", "kwargs", "message"),
    [
        (np.ones((2, 2, 2), np.float32), {}, "2-D"),
        (np.array([[np.nan]], np.float32), {}, "NaN"),
        (np.ones((2, 2), np.float32), {"bits": 9}, "bits"),
        (np.ones((2, 2), np.float32), {"axis": 2}, "axis"),
        (np.ones((2, 2), np.float32), {"channel_weights": -np.ones(2)}, "channel_weights"),
    ],
)
def test_bad_input_is_refused(weight, kwargs, message):
    args = {"bits": 3, "block_size": -1, "axis": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        fit_codebook(weight, **args)


@pytest.mark.parametrize(("block_size", "axis"), [(-1, 0), (-1, 1), (8, 0), (5, 1)])
def test_gptq_with_a_diagonal_hessian_is_the_nearest_entry_rounding(block_size, axis):
    """No correlation between input channels: no error to propagate, so GPTQ keeps the nearest codes."""
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(24, 20)).astype(np.float32)
    hessian = np.diag(rng.uniform(0.5, 2.0, 24))
    fitted = fit_codebook(weight, 2, block_size, axis, np.diag(hessian))
    gptq = quantize_gptq_codebook(weight, factor_hessian(hessian, damp=0.0), 2, block_size, axis)
    np.testing.assert_array_equal(gptq.tables, fitted.tables)
    np.testing.assert_array_equal(gptq.codes, fitted.codes)


@pytest.mark.parametrize("axis", [0, 1])
def test_gptq_lowers_the_output_error_on_correlated_inputs(axis):
    rng = np.random.default_rng(4)
    mixing = rng.normal(size=(64, 64)) + 3 * np.eye(64)
    inputs = rng.normal(size=(2048, 64)) @ mixing
    hessian = inputs.T @ inputs
    weight = rng.normal(size=(64, 48)).astype(np.float32)
    nearest = fit_codebook(weight, 3, -1, axis, np.diag(hessian)).dequantize()
    gptq = quantize_gptq_codebook(weight, factor_hessian(hessian), 3, -1, axis).dequantize()
    assert output_error(weight, gptq, hessian) < 0.8 * output_error(weight, nearest, hessian)


schemes = st.builds(
    QuantScheme,
    bits=st.sampled_from([2, 3, 4]),
    group_size=st.sampled_from([1, 3, 4, 16]),
    group_axis=st.sampled_from(["oc", "ic"]),
    clip_search=st.booleans(),
)


@settings(max_examples=200, deadline=None)
@given(weights, schemes, st.integers(0, 2**31 - 1))
@example(  # a group whose scale is subnormal
    np.array([[3e-45, 0, 0, 0, 0, 0, 0], [0] * 7, [0] * 7, [0, 0, 0, 1, 2, 0, 0]], np.float32),
    QuantScheme(bits=2, group_size=3, group_axis="ic"),
    0,
)
def test_shared_table_is_never_worse_than_the_integer_grid_with_the_same_groups(weight, scheme, seed):
    """A table fitted from the integer grid, under the grid's own scales and zero points, only lowers the
    weighted error; the codes index it and every group's table is the shared one scaled and shifted."""
    channel_weights = np.random.default_rng(seed).uniform(0.0, 3.0, weight.shape[0])
    fitted = fit_shared_table(weight, scheme, channel_weights)
    grid = quantize_rtn(weight, scheme, channel_weights)
    assert fitted.codes.shape == weight.shape and int(fitted.codes.max()) < 1 << scheme.bits
    ours = weighted_error(weight, fitted.dequantize(), channel_weights)
    theirs = weighted_error(weight, grid.dequantize(), channel_weights)
    assert ours <= theirs * (1 + 1e-5) + 1e-6 * float(np.sum(np.square(weight, dtype=np.float64)))
    tables = fitted.tables.reshape(-1, 1 << scheme.bits).astype(np.float64)
    scales = grid.scales.reshape(-1, 1).astype(np.float64)
    shared = tables / scales + grid.zero_points.reshape(-1, 1)
    # A group whose scale is (nearly) subnormal stores its levels on float32's coarse subnormal grid (a weight of
    # 3e-45 gives a scale of 1e-45), so its table is the shared one only as far as that grid can hold it.
    normal = (np.abs(scales) >= np.finfo(np.float32).tiny * 2**10).ravel()
    shared = shared[normal]
    np.testing.assert_allclose(shared, np.broadcast_to(shared[:1], shared.shape), rtol=1e-4, atol=1e-3)


def test_shared_table_moves_levels_towards_the_centre_of_bell_shaped_groups():
    """Normal weights under min-max groups: the fitted levels crowd the middle of the range, and the error
    drops well below the evenly spaced grid's."""
    weight = np.random.default_rng(5).normal(size=(256, 64)).astype(np.float32)
    scheme = QuantScheme(bits=3, group_size=128, group_axis="oc")
    fitted = fit_shared_table(weight, scheme)
    grid = quantize_rtn(weight, scheme)
    shared = fitted.tables[0, 0] / grid.scales[0, 0] + grid.zero_points[0, 0]
    steps = np.diff(shared)
    assert steps[len(steps) // 2] < steps[0] and steps[len(steps) // 2] < steps[-1]
    ones = np.ones(weight.shape[0])
    assert weighted_error(weight, fitted.dequantize(), ones) < 0.85 * weighted_error(weight, grid.dequantize(), ones)


def test_shared_table_refuses_symmetric_schemes():
    with pytest.raises(ValueError, match="asymmetric"):
        fit_shared_table(np.ones((4, 4), np.float32), QuantScheme(bits=3, group_size=4, symmetric=True))


@pytest.mark.parametrize("axis", ["oc", "ic"])
def test_gptq_onto_a_shared_table_lowers_the_output_error(axis):
    rng = np.random.default_rng(6)
    inputs = rng.normal(size=(2048, 64)) @ (rng.normal(size=(64, 64)) + 3 * np.eye(64))
    hessian = inputs.T @ inputs
    weight = rng.normal(size=(64, 48)).astype(np.float32)
    fitted = fit_shared_table(weight, QuantScheme(bits=3, group_size=16, group_axis=axis), np.diag(hessian))
    gptq = gptq_onto_tables(weight, factor_hessian(hessian), fitted)
    np.testing.assert_array_equal(gptq.tables, fitted.tables)
    assert output_error(weight, gptq.dequantize(), hessian) < 0.8 * output_error(weight, fitted.dequantize(), hessian)


def greedy_bcq(weight, bits, block_size, axis, channel_weights):
    """The residual-sign start of BCQ written out group by group: each scale the weighted mean |residual|."""

    def greedy(line, line_weights):
        line_weights = line_weights + 1e-30
        residual, approx = line.copy(), np.zeros_like(line)
        for _ in range(bits):
            alpha = np.sum(line_weights * np.abs(residual)) / np.sum(line_weights)
            step = alpha * np.where(residual >= 0, 1.0, -1.0)
            approx, residual = approx + step, residual - step
        return approx

    return by_group(weight, block_size, axis, greedy, channel_weights)


@settings(max_examples=200, deadline=None)
@given(weights, layouts, st.integers(0, 2**31 - 1))
def test_bcq_tables_are_signed_sums_and_never_worse_than_the_greedy_start(weight, layout, seed):
    bits, block_size, axis = layout
    channel_weights = np.random.default_rng(seed).uniform(0.0, 3.0, weight.shape[0])
    fitted = fit_bcq(weight, bits, block_size, axis, channel_weights, scale_dtype=np.float64)
    assert fitted.codes.dtype == np.uint8 and fitted.codes.shape == weight.shape
    assert int(fitted.codes.max()) < 1 << bits
    assert np.all(np.diff(fitted.tables, axis=-1) >= 0)
    np.testing.assert_array_equal(fitted.tables, -fitted.tables[..., ::-1])  # every signed sum, so symmetric
    ours = weighted_error(weight, fitted.dequantize(), channel_weights)
    start = weighted_error(weight, greedy_bcq(weight, bits, block_size, axis, channel_weights), channel_weights)
    stored = np.sum(channel_weights) * weight.shape[1] * float(np.finfo(np.float32).smallest_subnormal) ** 2
    assert ours <= start * (1 + 1e-5) + 1e-6 * float(np.sum(np.square(weight, dtype=np.float64))) + stored


@pytest.mark.parametrize(("shape", "block_size", "axis"), [((64, 40), 32, 0), ((40, 64), 32, 1), ((72, 9), 32, 0)])
def test_bcq_weights_come_back_exactly(shape, block_size, axis):
    """Every group sum_i alpha_i * b_i with float16 scales of its own, each sign pattern equally often (where the
    greedy start is already exact; alternating least squares can stop in a local optimum elsewhere): the fit finds
    those scales and signs (a ragged last group included)."""
    rng = np.random.default_rng(3)
    patterns = np.array([[1.0 if (p >> i) & 1 else -1.0 for i in range(3)] for p in range(8)])
    lines = shape[1] if axis == 0 else shape[0]  # the groups run along the other axis
    length = shape[axis]
    weight = np.empty((lines, length), np.float32)
    for line in range(lines):
        for start in range(0, length, block_size):
            size = min(block_size, length - start)
            chosen = rng.permutation(np.arange(size) % 8)
            alphas = np.array([0.5, 0.25, 0.125]) * 2.0 ** rng.integers(-6, 2)
            weight[line, start : start + size] = patterns[chosen] @ alphas
    weight = np.ascontiguousarray(weight.T if axis == 0 else weight)
    fitted = fit_bcq(weight, 3, block_size, axis)
    np.testing.assert_array_equal(fitted.dequantize(), weight)


@pytest.mark.parametrize("axis", [0, 1])
def test_gptq_onto_bcq_tables_lowers_the_output_error(axis):
    rng = np.random.default_rng(6)
    inputs = rng.normal(size=(2048, 64)) @ (rng.normal(size=(64, 64)) + 3 * np.eye(64))
    hessian = inputs.T @ inputs
    weight = rng.normal(size=(64, 48)).astype(np.float32)
    fitted = fit_bcq(weight, 3, 16, axis, np.diag(hessian))
    gptq = gptq_onto_tables(weight, factor_hessian(hessian), fitted)
    np.testing.assert_array_equal(gptq.tables, fitted.tables)
    assert output_error(weight, gptq.dequantize(), hessian) < 0.8 * output_error(weight, fitted.dequantize(), hessian)


def test_bcq_refuses_bad_bits():
    with pytest.raises(ValueError, match="table bits"):
        fit_bcq(np.ones((4, 4), np.float32), 0, 4, 0)
