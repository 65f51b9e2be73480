"""GPTQ on [K, N] weights: output error vs RTN, agreement with an unblocked reference, exactness laws."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.passes.quant import gptq as gptq_module
from lowbit.passes.quant.gptq import _round_row, factor_hessian, quantize_factored, quantize_gptq
from lowbit.passes.quant.rtn import (
    QuantizedWeight,
    expand_groups,
    group_params,
    quantize_rtn,
    quantize_with_params,
    search_group_params,
)
from lowbit.passes.quant.scheme import SUPPORTED_BITS, QuantScheme

LAWS = settings(max_examples=30, deadline=None)


def correlated_layer(seed: int, rows: int, cols: int, tokens: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """A random weight and the Hessian X^T X of strongly correlated inputs with uneven channel scales."""
    rng = np.random.default_rng(seed)
    factors = rng.standard_normal((tokens, max(rows // 4, 1))) @ rng.standard_normal((max(rows // 4, 1), rows))
    inputs = (factors + 0.1 * rng.standard_normal((tokens, rows))) * rng.lognormal(0.0, 1.0, rows)
    weight = rng.standard_normal((rows, cols)).astype(np.float32)
    return weight, inputs.T @ inputs


def output_error(weight: np.ndarray, approx: np.ndarray, hessian: np.ndarray) -> float:
    diff = weight.astype(np.float64) - approx
    return float(np.sum((hessian @ diff) * diff))


def reference_gptq(weight, hessian, scheme, *, damp=0.01, act_order=True) -> np.ndarray:
    """Unblocked float64 GPTQ in its OBQ form: explicit inverse Hessian, one row eliminated at a time."""
    rows = weight.shape[0]
    group, axis, bits, symmetric = scheme.block_size(weight.shape), scheme.block_axis, scheme.bits, scheme.symmetric
    hessian = hessian.copy()
    dead = np.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    order = np.argsort(-np.diag(hessian), kind="stable") if act_order else np.arange(rows)
    hessian = hessian[np.ix_(order, order)]
    inverse = np.linalg.inv(hessian + damp * np.mean(np.diag(hessian)) * np.eye(rows))
    current = weight[order].astype(np.float64)
    static_scales, static_zeros = group_params(weight, bits, group, 0, symmetric)
    block = group if axis == 1 else 1  # per-OC: each row is quantized with its own [1, N] slice
    result = np.empty(weight.shape, dtype=np.float32)
    for i, k in enumerate(order):
        row = current[i : i + 1].astype(np.float32)
        if axis == 1:
            scales, zeros = group_params(row, bits, group, 1, symmetric)
        elif act_order:
            scales, zeros = static_scales[k // group][None], static_zeros[k // group][None]
        elif i % group == 0:
            scales, zeros = group_params(current[i : i + group].astype(np.float32), bits, group, 0, symmetric)
        codes = quantize_with_params(row, scales, zeros, bits, block, axis)
        result[k] = QuantizedWeight(codes, scales, zeros, bits, block, axis, symmetric).dequantize()[0]
        current[i + 1 :] -= np.outer(inverse[i + 1 :, i], (current[i] - result[k]) / inverse[i, i])
        inverse -= np.outer(inverse[:, i], inverse[i, :]) / inverse[i, i]
    return result


def onnx_reconstruction(q: QuantizedWeight, scheme: QuantScheme) -> np.ndarray:
    """What blocked DequantizeLinear(axis, block_size) computes from the stored tensors."""
    shape = q.codes.shape
    block = scheme.block_size(shape)
    zero = expand_groups(q.zero_points, block, scheme.block_axis, shape).astype(np.int32)
    scale = expand_groups(q.scales, block, scheme.block_axis, shape)
    return (q.codes.astype(np.int32) - zero).astype(np.float32) * scale


@pytest.mark.parametrize("clip_search", [False, True])
@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("axis", ["oc", "ic"])
def test_output_error_below_rtn(axis, bits, symmetric, act_order, clip_search):
    weight, hessian = correlated_layer(bits * 10 + symmetric, 100, 72)  # group 32: ragged on both axes
    scheme = QuantScheme(bits=bits, group_size=32, group_axis=axis, symmetric=symmetric, clip_search=clip_search)
    gptq = output_error(weight, quantize_gptq(weight, hessian, scheme, act_order=act_order).dequantize(), hessian)
    rtn = output_error(weight, quantize_rtn(weight, scheme, np.diag(hessian)).dequantize(), hessian)
    assert gptq < 0.8 * rtn


@pytest.mark.parametrize(("update_width", "eager_rows"), [(1, 16), (7, 16), (128, 16), (128, 3), (7, 3), (11, 1)])
@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize(("axis", "group_size"), [("oc", 8), ("oc", -1), ("ic", 8), ("ic", -1)])
def test_matches_unblocked_reference(axis, group_size, act_order, update_width, eager_rows, monkeypatch):
    """Blocks of 7 or 11 rows, eager runs of 3 (a group's rows straddle runs and blocks, so the rows a group's
    parameters are made from carry updates still pending at both levels) and groups of 8: nothing aligns."""
    monkeypatch.setattr(gptq_module, "EAGER_ROWS", eager_rows)
    weight, hessian = correlated_layer(7, 30, 20)
    scheme = QuantScheme(bits=3, group_size=group_size, group_axis=axis)
    got = quantize_gptq(weight, hessian, scheme, update_width=update_width, act_order=act_order)
    expected = reference_gptq(weight, hessian, scheme, act_order=act_order)
    np.testing.assert_allclose(got.dequantize(), expected, rtol=0, atol=1e-5)


@LAWS
@given(
    bits=st.sampled_from(SUPPORTED_BITS),
    symmetric=st.booleans(),
    axis=st.sampled_from(["oc", "ic"]),
    group_size=st.sampled_from([-1, 1, 4, 5, 16]),
    act_order=st.booleans(),
    shape=st.tuples(st.integers(1, 23), st.integers(1, 23)),
    seed=st.integers(0, 2**16),
    clip_search=st.booleans(),
)
def test_stored_tensors_reconstruct_dequantize(bits, symmetric, axis, group_size, act_order, shape, seed, clip_search):
    weight, hessian = correlated_layer(seed, *shape, tokens=16)
    scheme = QuantScheme(
        bits=bits, group_size=group_size, group_axis=axis, symmetric=symmetric, clip_search=clip_search
    )
    q = quantize_gptq(weight, hessian, scheme, act_order=act_order, update_width=4)
    param_shape = list(shape)
    param_shape[scheme.block_axis] = -(-shape[scheme.block_axis] // scheme.block_size(shape))
    assert q.scales.shape == q.zero_points.shape == tuple(param_shape)
    assert q.codes.shape == shape
    assert q.codes.max() <= (1 << scheme.bits) - 1 and q.zero_points.max() <= (1 << scheme.bits) - 1
    assert (q.block_size, q.block_axis) == (scheme.block_size(shape), scheme.block_axis)
    assert (q.bits, q.symmetric) == (bits, symmetric)
    np.testing.assert_array_equal(onnx_reconstruction(q, scheme), q.dequantize())


@pytest.mark.parametrize("axis", ["oc", "ic"])
def test_act_order_per_oc_keeps_parameters_per_original_group(axis):
    """With act-order, per-OC parameters are those of the original consecutive groups (static groups)."""
    weight, hessian = correlated_layer(3, 40, 24)
    scheme = QuantScheme(bits=3, group_size=16, group_axis=axis)
    q = quantize_gptq(weight, hessian, scheme, act_order=True)
    rtn = quantize_rtn(weight, scheme)
    first = int(np.argmax(np.diag(hessian)))  # processed first, so still holds its original values
    if axis == "oc":
        np.testing.assert_array_equal(q.scales, rtn.scales)
        np.testing.assert_array_equal(q.zero_points, rtn.zero_points)
    else:
        np.testing.assert_array_equal(q.scales[first], rtn.scales[first])
    np.testing.assert_array_equal(q.codes[first], rtn.codes[first])


def grid_weight(rng, shape, bits, group, axis) -> np.ndarray:
    """An asymmetric-grid weight that RTN reproduces exactly: every group holds codes 0 and 2**bits - 1.

    Scales are powers of two so that min, max and the scale are exact in float32. A one-element group
    can hold only one code, so its zero point is 0 (the code is 2**bits - 1). The symmetric grid has no
    such weights: its scale 2 * max|w| / (2**bits - 1) is set by a value that is off the grid.
    """
    max_code = (1 << bits) - 1
    moved = (shape[axis], shape[1 - axis])
    position = np.arange(moved[0])
    first = position % group == 0
    last = (position % group == group - 1) | (position == moved[0] - 1)
    groups = -(-moved[0] // group)
    scales = 2.0 ** rng.integers(-8, 3, (groups, moved[1]))
    zero_points = rng.integers(0, max_code + 1, (groups, moved[1]))
    zero_points[first[::group] & last[::group]] = 0
    codes = rng.integers(0, max_code + 1, moved)
    codes[first] = 0
    codes[last] = max_code
    values = (codes - expand_groups(zero_points, group, 0, moved)) * expand_groups(scales, group, 0, moved)
    return np.ascontiguousarray(np.moveaxis(values, 0, axis)).astype(np.float32)


@LAWS
@given(
    bits=st.sampled_from(SUPPORTED_BITS),
    axis=st.sampled_from(["oc", "ic"]),
    group_size=st.sampled_from([1, 3, 8, 20]),
    act_order=st.booleans(),
    shape=st.tuples(st.integers(1, 20), st.integers(1, 20)),
    seed=st.integers(0, 2**16),
)
def test_weight_on_grid_is_recovered_exactly(bits, axis, group_size, act_order, shape, seed):
    scheme = QuantScheme(bits=bits, group_size=group_size, group_axis=axis, symmetric=False)
    weight = grid_weight(np.random.default_rng(seed), shape, bits, scheme.block_size(shape), scheme.block_axis)
    np.testing.assert_array_equal(quantize_rtn(weight, scheme).dequantize(), weight)  # the premise
    _, hessian = correlated_layer(seed, shape[0], 1)
    q = quantize_gptq(weight, hessian, scheme, act_order=act_order, update_width=8)
    np.testing.assert_array_equal(q.dequantize(), weight)


@LAWS
@given(
    bits=st.sampled_from(SUPPORTED_BITS),
    symmetric=st.booleans(),
    axis=st.sampled_from(["oc", "ic"]),
    group_size=st.sampled_from([-1, 4, 7]),
    act_order=st.booleans(),
    shape=st.tuples(st.integers(1, 20), st.integers(1, 20)),
    seed=st.integers(0, 2**16),
)
def test_uncorrelated_inputs_reduce_to_rtn(bits, symmetric, axis, group_size, act_order, shape, seed):
    """A diagonal Hessian couples no input channels, so there is no error to propagate: GPTQ == RTN."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal(shape).astype(np.float32)
    hessian = np.diag(rng.lognormal(0.0, 2.0, shape[0]))
    scheme = QuantScheme(bits=bits, group_size=group_size, group_axis=axis, symmetric=symmetric)
    q = quantize_gptq(weight, hessian, scheme, act_order=act_order, update_width=3)
    rtn = quantize_rtn(weight, scheme)
    np.testing.assert_array_equal(q.codes, rtn.codes)
    np.testing.assert_array_equal(q.scales, rtn.scales)
    np.testing.assert_array_equal(q.zero_points, rtn.zero_points)


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("axis", ["oc", "ic"])
def test_dead_inputs_keep_their_weights_with_rtn_semantics(axis, act_order):
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((48, 40)).astype(np.float32)
    inputs = rng.standard_normal((200, 12)) @ rng.standard_normal((12, 48))
    dead = np.array([0, 9, 10, 47])
    inputs[:, dead] = 0.0
    hessian = inputs.T @ inputs
    scheme = QuantScheme(bits=3, group_size=16, group_axis=axis)
    q = quantize_gptq(weight, hessian, scheme, act_order=act_order)
    approx = q.dequantize()
    assert np.isfinite(approx).all()
    own_params = quantize_with_params(weight, q.scales, q.zero_points, 3, q.block_size, q.block_axis)
    np.testing.assert_array_equal(q.codes[dead], own_params[dead])  # rounded from the original values
    assert np.abs(approx[dead]).sum() > 0
    rtn = quantize_rtn(weight, scheme)
    assert output_error(weight, approx, hessian) < output_error(weight, rtn.dequantize(), hessian)


def test_all_dead_hessian_gives_rtn():
    weight = np.random.default_rng(0).standard_normal((20, 12)).astype(np.float32)
    scheme = QuantScheme(bits=4, group_size=8, group_axis="oc")
    q = quantize_gptq(weight, np.zeros((20, 20)), scheme)
    np.testing.assert_array_equal(q.dequantize(), quantize_rtn(weight, scheme).dequantize())


@pytest.mark.parametrize(
    ("weight", "hessian", "kwargs"),
    [
        (np.ones((4, 3)), np.eye(3), {}),
        (np.ones(4), np.eye(4), {}),
        (np.full((2, 2), np.nan), np.eye(2), {}),
        (np.ones((2, 2)), np.full((2, 2), np.inf), {}),
        (np.ones((2, 2)), np.eye(2), {"update_width": 0}),
        (np.ones((2, 2)), np.eye(2), {"damp": -1.0}),
        (np.ones((2, 2)), -np.eye(2), {}),
    ],
)
def test_rejects_bad_inputs(weight, hessian, kwargs):
    with pytest.raises(ValueError):
        quantize_gptq(weight, hessian, QuantScheme(), **kwargs)


@pytest.mark.parametrize("symmetric", [False, True])
def test_clip_search_with_act_order_per_oc_searches_the_static_groups_by_diag_h(symmetric):
    """Static per-OC groups are made once from the original weight: by the search, each input channel's
    error weighted by its H_kk, exactly as ``search_group_params`` does it."""
    weight, hessian = correlated_layer(11, 48, 20)
    scheme = QuantScheme(bits=3, group_size=16, group_axis="oc", symmetric=symmetric, clip_search=True)
    got = quantize_gptq(weight, hessian, scheme, act_order=True)
    scales, zero_points = search_group_params(weight, 3, 16, 0, symmetric, np.diag(hessian))
    np.testing.assert_array_equal(got.scales, scales)
    np.testing.assert_array_equal(got.zero_points, zero_points)
    plain = quantize_gptq(weight, hessian, dataclasses.replace(scheme, clip_search=False), act_order=True)
    assert not np.array_equal(got.scales, plain.scales)  # the search clipped some group here


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("axis", ["oc", "ic"])
def test_clip_search_lowers_gptq_output_error_of_gaussian_weights(axis, act_order):
    """Weakly correlated inputs with uneven channel scales (measured: 0.36x per-OC, where diag(H) lets the
    search clip cheap channels; 0.91x per-IC). Not a law: with the strongly correlated inputs of
    ``correlated_layer`` GPTQ's updates push weights past a clipped static range and the search can lose."""
    rng = np.random.default_rng(12)
    inputs = (rng.standard_normal((1024, 128)) + 0.3 * rng.standard_normal((1024, 1))) * rng.lognormal(0.0, 1.0, 128)
    hessian = inputs.T @ inputs
    weight = rng.normal(size=(128, 96)).astype(np.float32)
    scheme = QuantScheme(bits=3, group_size=32, group_axis=axis)
    plain = output_error(weight, quantize_gptq(weight, hessian, scheme, act_order=act_order).dequantize(), hessian)
    clipped_scheme = dataclasses.replace(scheme, clip_search=True)
    clipped = output_error(
        weight, quantize_gptq(weight, hessian, clipped_scheme, act_order=act_order).dequantize(), hessian
    )
    assert clipped < 0.95 * plain


@LAWS
@given(
    bits=st.sampled_from(SUPPORTED_BITS),
    symmetric=st.booleans(),
    act_order=st.booleans(),
    clip_search=st.booleans(),
    group_size=st.sampled_from([-1, 3, 8]),
    shape=st.tuples(st.integers(1, 20), st.integers(1, 20)),
    seed=st.integers(0, 2**16),
)
def test_one_factor_serves_every_layout_and_weight(bits, symmetric, act_order, clip_search, group_size, shape, seed):
    """AdaDim quantizes a weight per-OC and per-IC, q/k/v share their input: one factorisation of H gives
    each of them exactly what ``quantize_gptq`` (which factors H itself) gives."""
    weight, hessian = correlated_layer(seed, *shape, tokens=16)
    other = np.random.default_rng(seed).standard_normal((shape[0], 7)).astype(np.float32)
    factor = factor_hessian(hessian, damp=0.01, act_order=act_order)
    for axis in ("oc", "ic"):
        scheme = QuantScheme(bits, group_size, axis, symmetric, "gptq", clip_search)
        for w in (weight, other):
            got = quantize_factored(w, factor, scheme, update_width=4)
            expected = quantize_gptq(w, hessian, scheme, act_order=act_order, update_width=4)
            for name in ("codes", "scales", "zero_points"):
                np.testing.assert_array_equal(getattr(got, name), getattr(expected, name))


def test_factor_of_another_width_is_refused():
    weight, hessian = correlated_layer(0, 6, 4)
    with pytest.raises(ValueError, match="factor is for 6 rows"):
        quantize_factored(np.ones((5, 4), np.float32), factor_hessian(hessian), QuantScheme())


@LAWS
@given(
    bits=st.sampled_from(SUPPORTED_BITS),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
    spread=st.sampled_from([1e-30, 1e-3, 1.0, 1e4, 1e30]),
)
def test_row_rounding_is_the_stored_reconstruction_bit_for_bit(bits, symmetric, seed, spread):
    """The error GPTQ propagates comes from ``_round_row``: it must equal the codes ``quantize_with_params``
    stores and the values ``dequantize`` (ONNX Runtime) reconstructs, also for values far outside the grid
    (clipped codes) and for extreme scales."""
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal((1, 24)) * spread).astype(np.float32)
    grid = (rng.standard_normal((1, 24)) * spread * rng.choice([0.01, 1.0])).astype(np.float32)
    scales, zero_points = group_params(grid, bits, 5, 1, symmetric)
    expected_codes = quantize_with_params(values, scales, zero_points, bits, 5, 1)
    expected = QuantizedWeight(expected_codes, scales, zero_points, bits, 5, 1, symmetric).dequantize()
    row_scales = expand_groups(scales, 5, 1, values.shape)[0]
    row_offsets = expand_groups(zero_points, 5, 1, values.shape)[0].astype(np.float32)
    codes, rounded = _round_row(values[0], row_scales, row_offsets, (1 << bits) - 1)
    np.testing.assert_array_equal(codes, expected_codes[0])
    np.testing.assert_array_equal(rounded, expected[0])


@LAWS
@given(
    channels=st.sampled_from([1, 2, 3, 63, 64, 65, 127, 128, 129, 130, 191, 200]),
    act_order=st.booleans(),
    dead=st.booleans(),
    damp=st.sampled_from([0.0, 0.01, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_factor_is_the_inverse_cholesky_of_the_ordered_damped_hessian(channels, act_order, dead, damp, seed):
    """``U^T U = (P H P^T + damping)^-1`` with ``U`` upper triangular, the rows in ``order`` (by decreasing
    ``H[k, k]`` with act-order), dead channels' ``H[k, k]`` set to 1 before the damping's mean; sizes around the
    in-place reversal's 64-row blocks."""
    rng = np.random.default_rng(seed)
    tokens = rng.standard_normal((2 * channels + 5, channels)) * rng.uniform(0.1, 10, channels)
    if dead:
        tokens[:, rng.integers(0, channels)] = 0
    hessian = tokens.T @ tokens
    original = hessian.copy()
    factor = factor_hessian(hessian, damp=damp, act_order=act_order)
    np.testing.assert_array_equal(hessian, original)  # the caller's H is not touched
    diagonal = np.where(np.diag(hessian) == 0, 1.0, np.diag(hessian))
    expected_order = np.argsort(-diagonal, kind="stable") if act_order else np.arange(channels)
    np.testing.assert_array_equal(factor.order, expected_order)
    np.testing.assert_array_equal(factor.channel_weights, np.diag(hessian))
    damped = hessian.copy()
    damped[np.diag_indices(channels)] = diagonal
    damped = damped[np.ix_(expected_order, expected_order)] + damp * diagonal.mean() * np.eye(channels)
    upper = factor.inv_chol.astype(np.float64)
    assert factor.inv_chol.dtype == np.float32 and np.array_equal(upper, np.triu(upper))
    np.testing.assert_allclose(upper.T @ upper @ damped, np.eye(channels), atol=2e-3 * np.sqrt(channels))


def test_factor_works_beside_the_hessian_in_one_working_copy():
    """The largest temporaries of a layer's quantization: besides H, one float64 [K, K] working copy and the
    float32 result, not the copies of a straightforward ordering, reversal and inversion."""
    import tracemalloc

    channels = 512
    tokens = np.random.default_rng(0).standard_normal((600, channels))
    hessian = tokens.T @ tokens
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        factor_hessian(hessian)
        extra = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert extra <= 1.6 * hessian.nbytes, f"{extra / hessian.nbytes:.2f} x H"


@pytest.mark.parametrize("rows", [1, 2, 3, 127, 128, 129, 255, 256, 257, 300])
def test_reverse_in_place_is_the_rotation_by_half_a_turn(rows):
    matrix = np.asfortranarray(np.random.default_rng(rows).standard_normal((rows, rows + 3)))
    expected = matrix[::-1, ::-1].copy()
    gptq_module._reverse_in_place(matrix)
    np.testing.assert_array_equal(matrix, expected)
