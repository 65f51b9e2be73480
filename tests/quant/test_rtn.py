"""RTN group quantization: laws that hold for every weight (hypothesis) and edge cases."""

import math
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lowbit.passes.quant import rtn
from lowbit.passes.quant.rtn import group_params, quantize_rtn, relative_error, search_group_params
from lowbit.passes.quant.scheme import SUPPORTED_BITS, QuantScheme

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
weights = st.integers(1, 19).flatmap(
    lambda k: st.integers(1, 19).flatmap(lambda n: arrays(np.float32, (k, n), elements=finite))
)
schemes = st.builds(
    QuantScheme,
    bits=st.sampled_from(SUPPORTED_BITS),
    group_size=st.sampled_from([-1, 1, 3, 4, 7, 16]),
    group_axis=st.sampled_from(["oc", "ic"]),
    symmetric=st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(weights, schemes)
def test_codes_in_range_and_error_within_half_a_step(weight, scheme):
    quantized = quantize_rtn(weight, scheme)
    assert quantized.codes.dtype == np.uint8
    assert quantized.codes.max() <= (1 << scheme.bits) - 1
    assert quantized.zero_points.max() <= (1 << scheme.bits) - 1
    length = weight.shape[scheme.block_axis]
    groups = math.ceil(length / scheme.block_size(weight.shape))
    assert quantized.scales.shape[scheme.block_axis] == groups
    assert quantized.scales.shape[1 - scheme.block_axis] == weight.shape[1 - scheme.block_axis]
    error = np.abs(quantized.dequantize().astype(np.float64) - weight)
    half_step = quantized.expand(quantized.scales).astype(np.float64) / 2
    # float32 rounding of w / scale and of the product adds a few ulps on top of the half step
    assert np.all(error <= half_step * (1 + 1e-5) + 1e-6 * np.abs(weight) + 1e-30)


@settings(max_examples=150, deadline=None)
@given(weights, schemes)
def test_per_ic_of_w_equals_per_oc_of_w_transposed(weight, scheme):
    per_ic = quantize_rtn(weight, QuantScheme(scheme.bits, scheme.group_size, "ic", scheme.symmetric))
    per_oc = quantize_rtn(
        np.ascontiguousarray(weight.T), QuantScheme(scheme.bits, scheme.group_size, "oc", scheme.symmetric)
    )
    np.testing.assert_array_equal(per_ic.codes, per_oc.codes.T)
    np.testing.assert_array_equal(per_ic.scales, per_oc.scales.T)
    np.testing.assert_array_equal(per_ic.zero_points, per_oc.zero_points.T)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_zero_weight_is_reconstructed_exactly(bits, symmetric):
    weight = np.zeros((10, 6), np.float32)
    quantized = quantize_rtn(weight, QuantScheme(bits, 4, "oc", symmetric))
    np.testing.assert_array_equal(quantized.dequantize(), weight)
    assert np.all(quantized.scales == 1.0)


@pytest.mark.parametrize("value", [3.25, -0.5, 1e-6])
@pytest.mark.parametrize("axis", ["oc", "ic"])
def test_constant_groups_are_reconstructed(value, axis):
    weight = np.full((8, 8), value, np.float32)
    quantized = quantize_rtn(weight, QuantScheme(4, 4, axis))
    np.testing.assert_allclose(quantized.dequantize(), weight, rtol=1e-6)


def test_per_ic_isolates_an_outlier_input_channel_and_per_oc_smears_it():
    """Input channel 0 holds tiny weights next to large ones in its per-OC groups: per-IC keeps its own scale."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((128, 64)).astype(np.float32)
    weight[0] *= 1e-3
    per_oc = quantize_rtn(weight, QuantScheme(4, 128, "oc")).dequantize()
    per_ic = quantize_rtn(weight, QuantScheme(4, 64, "ic")).dequantize()
    assert relative_error(weight[0], per_ic[0]) < 0.2
    assert relative_error(weight[0], per_oc[0]) >= 0.99  # the tiny row rounds to zero on the shared grid


def test_symmetric_codes_use_all_levels_in_the_signed_domain():
    weight = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)
    quantized = quantize_rtn(weight, QuantScheme(4, -1, "oc", symmetric=True))
    signed = quantized.signed_codes()
    assert signed.min() == -8 and signed.max() == 7
    assert np.all(quantized.zero_points == 8)


@pytest.mark.parametrize(
    "weight, message",
    [
        (np.array([[1.0, np.nan]], np.float32), "NaN or Inf"),
        (np.array([[np.inf, 1.0]], np.float32), "NaN or Inf"),
        (np.zeros((0, 4), np.float32), "empty"),
        (np.zeros(4, np.float32), "2-D"),
        (np.array([[3e38, -3e38]], np.float32), "float32 range"),  # the symmetric scale was Inf, W_hat NaN
    ],
)
def test_bad_weights_raise(weight, message):
    with pytest.raises(ValueError, match=message):
        quantize_rtn(weight, QuantScheme())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 7}, "bits"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": -2}, "group_size"),
        ({"group_axis": "x"}, "group_axis"),
        ({"method": "awq"}, "method"),
    ],
)
def test_scheme_rejects_out_of_range_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantScheme(**kwargs)


def _weighted_group_error(weight, scales, zero_points, bits, block, axis, symmetric, channel_weights):
    codes = rtn.quantize_with_params(weight, scales, zero_points, bits, block, axis)
    approx = rtn.QuantizedWeight(codes, scales, zero_points, bits, block, axis, symmetric).dequantize()
    squared = channel_weights[:, None] * np.square(weight.astype(np.float64) - approx)
    return np.add.reduceat(squared, rtn.group_starts(weight.shape[axis], block), axis=axis)


@settings(max_examples=200, deadline=None)
@given(weights, schemes, st.integers(0, 2**16))
def test_clip_search_never_raises_any_groups_weighted_error(weight, scheme, seed):
    """Ratio 1.0 (plain min-max) is a candidate, so every group's weighted error is at most min-max's."""
    channel_weights = np.random.default_rng(seed).exponential(size=weight.shape[0])
    block, axis = scheme.block_size(weight.shape), scheme.block_axis
    searched = search_group_params(weight, scheme.bits, block, axis, scheme.symmetric, channel_weights)
    plain = group_params(weight, scheme.bits, block, axis, scheme.symmetric)
    args = (scheme.bits, block, axis, scheme.symmetric, channel_weights)
    assert np.all(_weighted_group_error(weight, *searched, *args) <= _weighted_group_error(weight, *plain, *args))


@settings(max_examples=200, deadline=None)
@given(weights, schemes, st.integers(0, 2**16))
def test_clip_search_finds_each_groups_best_ratio(weight, scheme, seed):
    """Against a plain loop over the ratios (``group_params`` of the shrunk weight, error from the
    dequantized weight): every group gets the lowest error any ratio gives, and these parameters."""
    channel_weights = np.random.default_rng(seed).exponential(size=weight.shape[0])
    block, axis = scheme.block_size(weight.shape), scheme.block_axis
    args = (scheme.bits, block, axis, scheme.symmetric, channel_weights)
    per_ratio = [
        group_params(np.float32(ratio) * weight, scheme.bits, block, axis, scheme.symmetric)
        for ratio in rtn.CLIP_RATIOS
    ]
    errors = np.stack([_weighted_group_error(weight, *params, *args) for params in per_ratio])
    searched = search_group_params(weight, *args)
    np.testing.assert_allclose(_weighted_group_error(weight, *searched, *args), errors.min(axis=0), rtol=1e-9, atol=0)
    lowest, runner_up = np.sort(errors, axis=0)[:2]  # CLIP_RATIOS has 21 ratios
    clear_winner = runner_up - lowest > 1e-9 * lowest  # elsewhere two ratios tie to rounding and either may win
    best = np.argmin(errors, axis=0)
    for got, candidates in zip(searched, zip(*per_ratio)):
        expected = np.take_along_axis(np.stack(candidates), best[None], axis=0)[0]
        np.testing.assert_array_equal(got[clear_winner], expected[clear_winner])


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("axis", [0, 1])
def test_clip_search_with_only_ratio_one_is_min_max(axis, symmetric):
    weight = np.random.default_rng(0).normal(size=(37, 29)).astype(np.float32)
    searched = search_group_params(weight, 3, 8, axis, symmetric, ratios=np.array([1.0]))
    plain = group_params(weight, 3, 8, axis, symmetric)
    for got, expected in zip(searched, plain):
        np.testing.assert_array_equal(got, expected)


def test_clip_search_clips_cheap_outliers_and_keeps_a_costly_one():
    """A group of small weights and two big ones: at 2 bits, clipping the big ones buys a finer step for
    all the others, unless one's input channel is costly (a large H_kk) enough to outweigh them."""
    weight = np.random.default_rng(1).uniform(-1, 1, size=(128, 1)).astype(np.float32)
    weight[5, 0], weight[9, 0] = 2.0, -2.0
    plain = group_params(weight, 2, 128, 0, False)
    cheap = np.ones(128)
    clipped = search_group_params(weight, 2, 128, 0, False, cheap)
    assert clipped[0][0, 0] < 0.8 * plain[0][0, 0]
    errors = [_weighted_group_error(weight, *params, 2, 128, 0, False, cheap).item() for params in (plain, clipped)]
    assert errors[1] < 0.7 * errors[0]
    costly = np.ones(128)
    costly[5] = 1e6
    kept = search_group_params(weight, 2, 128, 0, False, costly)
    assert kept[0][0, 0] > clipped[0][0, 0]
    codes = rtn.quantize_with_params(weight, *kept, 2, 128, 0)
    approx = rtn.QuantizedWeight(codes, *kept, 2, 128, 0, False).dequantize()
    assert abs(approx[5, 0] - weight[5, 0]) <= kept[0][0, 0] / 2 * (1 + 1e-6)  # the costly weight is not clipped


def _reference_search_group_params(weight, bits, block_size, axis, symmetric, channel_weights=None, ratios=None):
    """``search_group_params`` as it was before its blocked evaluation (all ratios in chunks of 2**22
    elements), kept verbatim as the reference the faster one must equal bit for bit; also returns every
    candidate's error (ratio, group)."""
    ratios = rtn.CLIP_RATIOS if ratios is None else ratios
    weight = np.asarray(weight, dtype=np.float32)
    row_weights = np.ones(weight.shape[0]) if channel_weights is None else np.asarray(channel_weights, dtype=np.float64)
    ratios = np.asarray(ratios, dtype=np.float32)
    length = weight.shape[axis]
    num_groups = -(-length // block_size)
    padding = num_groups * block_size - length
    grouped_shape = list(weight.shape)
    grouped_shape[axis : axis + 1] = [num_groups, block_size]
    members = axis + 1
    if padding:
        weight = np.pad(weight, [(0, padding) if a == axis else (0, 0) for a in range(2)], mode="edge")
    grouped = weight.reshape(grouped_shape)
    if axis == 0:
        element_weights = np.pad(row_weights, (0, padding)).reshape(num_groups, block_size, 1)
    else:
        real_members = (np.arange(num_groups * block_size) < length).reshape(num_groups, block_size)
        element_weights = row_weights.reshape(-1, 1, 1) * real_members
    group_min = grouped.min(axis=members, keepdims=True)
    group_max = grouped.max(axis=members, keepdims=True)
    chunk = max(1, (1 << 22) // grouped.size)
    candidates = []
    for first in range(0, len(ratios), chunk):
        shrink = ratios[first : first + chunk].reshape(-1, 1, 1, 1)
        scales, zero_points = rtn.range_params(shrink * group_min, shrink * group_max, bits, symmetric)
        offsets = zero_points.astype(np.float32)
        codes = np.clip(np.round(grouped / scales) + offsets, 0, (1 << bits) - 1)
        residual = grouped - (codes - offsets) * scales
        error = np.sum(element_weights * np.square(residual, dtype=np.float64), axis=members + 1)
        candidates.append((error, scales.squeeze(members + 1), zero_points.squeeze(members + 1)))
    error, scales, zero_points = (np.concatenate(parts) for parts in zip(*candidates))
    pick = np.argmin(error, axis=0)[None]
    return (*(np.take_along_axis(a, pick, axis=0)[0] for a in (scales, zero_points)), error)


_DEFAULT_EVALUATION = (rtn._SEARCH_ALL_AT_ONCE_ELEMENTS, rtn._SEARCH_BLOCK_ELEMENTS)
_LENGTHS = st.one_of(st.integers(1, 12), st.integers(13, 200), st.just(576))


@settings(max_examples=250, deadline=None)
@given(
    num_rows=_LENGTHS,
    num_cols=_LENGTHS,
    axis=st.sampled_from([0, 1]),
    group=st.sampled_from([1, 3, 8, 16, 100, 128, -1]),
    bits=st.sampled_from(SUPPORTED_BITS),
    symmetric=st.booleans(),
    weighted=st.booleans(),
    values=st.sampled_from(["normal", "heavy", "integers", "constant"]),
    ratios=st.sampled_from([None, [1.0], [0.9, 1.0, 0.9, 0.6]]),
    evaluation=st.sampled_from([_DEFAULT_EVALUATION, (0, _DEFAULT_EVALUATION[1]), (0, 1), (0, 37), (0, 5000)]),
    seed=st.integers(0, 2**16),
)
def test_clip_search_equals_the_reference_bit_for_bit(
    num_rows, num_cols, axis, group, bits, symmetric, weighted, values, ratios, evaluation, seed
):
    """All ratios at once or one at a time on cache blocks (thresholds lowered so that small weights take
    the blocked path too, blocks down to the two-slice minimum): the scales, the zero points and every
    candidate's error are exactly the reference's, also for short last groups, single rows and ties (integer
    and constant weights)."""
    rng = np.random.default_rng(seed)
    shape = (num_rows, num_cols)
    weight = {
        "normal": lambda: rng.standard_normal(shape),
        "heavy": lambda: rng.standard_t(2, shape) * 10.0 ** rng.integers(-20, 20),
        "integers": lambda: rng.integers(-3, 4, shape),
        "constant": lambda: np.full(shape, rng.standard_normal()),
    }[values]().astype(np.float32)
    block = weight.shape[axis] if group == -1 else min(group, weight.shape[axis])
    channel_weights = rng.exponential(size=num_rows) if weighted else None
    args = (weight, bits, block, axis, symmetric, channel_weights)
    *expected, expected_error = _reference_search_group_params(*args, ratios=ratios)
    ratios = rtn.CLIP_RATIOS if ratios is None else ratios
    with (
        mock.patch.object(rtn, "_SEARCH_ALL_AT_ONCE_ELEMENTS", evaluation[0]),
        mock.patch.object(rtn, "_SEARCH_BLOCK_ELEMENTS", evaluation[1]),
    ):
        got = search_group_params(*args, ratios=ratios)
        # the errors too: a last-bit difference in them seldom changes a winner
        error, _, _ = rtn._candidate_errors(*args, ratios, "float32")
    for got_params, expected_params in zip(got, expected, strict=True):
        assert got_params.dtype == expected_params.dtype
        np.testing.assert_array_equal(got_params, expected_params, strict=True)
    np.testing.assert_array_equal(error, expected_error, strict=True)


def test_clip_search_rejects_channel_weights_of_the_wrong_length():
    with pytest.raises(ValueError, match="one entry per row"):
        search_group_params(np.ones((4, 3), np.float32), 4, 2, 0, False, np.ones(3))


@pytest.mark.parametrize("axis", ["oc", "ic"])
def test_rtn_with_clip_search_lowers_the_error_of_gaussian_weights(axis):
    """Groups of 64 Gaussian weights at 3 bits: the min-max range spends levels on rare tails (measured: 10 % lower)."""
    weight = np.random.default_rng(4).normal(size=(256, 192)).astype(np.float32)
    plain = quantize_rtn(weight, QuantScheme(bits=3, group_size=64, group_axis=axis))
    searched = quantize_rtn(weight, QuantScheme(bits=3, group_size=64, group_axis=axis, clip_search=True))
    assert relative_error(weight, searched.dequantize()) < 0.95 * relative_error(weight, plain.dequantize())


FLOAT16_SMALLEST_NORMAL = float(np.finfo(np.float16).smallest_normal)


@settings(max_examples=200, deadline=None)
@given(
    arrays(
        np.float32,
        st.integers(1, 40),
        elements=st.floats(2.0**-40, 2.0**127, width=32)
        | st.sampled_from([1e-8, 6e-5, 6.1035156e-05, 65504.0, 65519.0, 65520.0, 7e4]),
    )
)
def test_float16_scales_are_the_nearest_float16_values_within_its_normal_range(scales):
    """A scale in float16's normal range becomes its nearest float16 value (relative change <= 2**-11); any
    other stays as it is (its weight then keeps float32 scales); float32 changes nothing."""
    np.testing.assert_array_equal(rtn.round_scales(scales, "float32"), scales)
    rounded = rtn.round_scales(scales, "float16")
    assert rounded.dtype == np.float32
    with np.errstate(over="ignore"):
        as_half = scales.astype(np.float16).astype(np.float32)
    in_range = (scales >= FLOAT16_SMALLEST_NORMAL) & (scales <= 65504.0) & np.isfinite(as_half)
    np.testing.assert_array_equal(rounded[in_range], as_half[in_range])
    np.testing.assert_array_equal(rounded[~in_range], scales[~in_range])
    assert np.all(np.abs(rounded - scales) <= scales * 2.0**-11)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("clip_search", [False, True])
@pytest.mark.parametrize("axis", ["oc", "ic"])
def test_float16_scales_are_chosen_before_the_codes(method, clip_search, axis):
    """With scale_dtype float16 every scale RTN, clip search and GPTQ's per-group parameters produce is a
    float16 value, and the codes are the nearest ones under those scales (RTN) or GPTQ's: the output error
    stays within 2 % of float32 scales'."""
    from lowbit.passes.quant.gptq import quantize_gptq

    rng = np.random.default_rng(5)
    weight = (rng.standard_normal((96, 80)) * 0.05).astype(np.float32)
    x = rng.standard_normal((256, 96))
    hessian = x.T @ x / len(x)
    results = {}
    for scale_dtype in ("float32", "float16"):
        scheme = QuantScheme(3, 32, axis, method=method, clip_search=clip_search, scale_dtype=scale_dtype)
        if method == "gptq":
            results[scale_dtype] = quantize_gptq(weight, hessian, scheme)
        else:
            results[scale_dtype] = quantize_rtn(weight, scheme, channel_weights=np.diag(hessian))
    half = results["float16"]
    np.testing.assert_array_equal(half.scales.astype(np.float16).astype(np.float32), half.scales)
    if method == "rtn":
        expected = rtn.quantize_with_params(weight, half.scales, half.zero_points, 3, 32, half.block_axis)
        np.testing.assert_array_equal(half.codes, expected)

    def output_error(quantized):
        delta = (quantized.dequantize() - weight).astype(np.float64)
        return float(np.einsum("kn,kl,ln->", delta, hessian, delta))

    assert output_error(half) <= 1.02 * output_error(results["float32"])


def test_scheme_refuses_an_unknown_scale_dtype():
    with pytest.raises(ValueError, match="scale_dtype must be one of"):
        QuantScheme(scale_dtype="bfloat16")
