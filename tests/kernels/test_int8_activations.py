"""``lowbit::QuantMatMul`` with ``int8_activations=1``: the kernels against the NumPy oracle (which rounds the
activations exactly as they must), the oracle's own laws, and the attribute's validation.

The kernels compute the same int8 codes as the oracle, so they agree to float32 round-off of the block
sums (``cases.assert_matches_reference``); every instruction set this CPU has runs every case.
"""

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.kernels import packing, reference
from lowbit.kernels.model import QuantMatMulWeights, quant_matmul_model
from lowbit.runtime.session import session_options

from .cases import AXES, BITS, SHAPES, add_outliers, assert_matches_reference, make_weights
from .test_cpu_kernel import run_kernel

BATCHES = (1, 2, 5, 8, 13, 40)  # one row, the rows of one register block and their remainders, many rows


def int8_weights(k, n, group, bits, axis, symmetric, extras, rng) -> QuantMatMulWeights:
    weights = make_weights(rng.standard_normal((k, n)).astype(np.float32), bits, group, axis, symmetric, extras, rng)
    return dataclasses.replace(weights, int8_activations=True)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "K{}xN{}g{}".format(*s))
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("axis", AXES)
def test_kernel_matches_oracle(ops_library, isa, shape, bits, axis):
    """Ragged K and N, groups that split quads, vectors and tiles, one group; permutation and bias on half."""
    k, n, group = shape
    rng = np.random.default_rng([k, n, group, bits, 8])
    extras = (k + bits) % 2 == 0
    weights = int8_weights(k, n, group, bits, axis, bits % 2 == 0, extras, rng)
    a = rng.standard_normal((max(BATCHES), k)).astype(np.float32)
    for batch in BATCHES:
        assert_matches_reference(run_kernel(weights, a[:batch]), weights, a[:batch])
    assert_matches_reference(run_kernel(weights, a[:3], constant_weights=False), weights, a[:3])


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("axis, group", [("oc", 128), ("oc", 13), ("ic", 64), ("ic", 128), ("ic", 192), ("ic", 1000)])
def test_one_row_over_many_tiles_and_tasks(ops_library, isa, bits, axis, group):
    """One row streams several tiles at once where tiles are long (2048 input channels: at least
    kInt8StreamTileBytes at every width): more tiles than one step, a ragged last tile, per-IC groups of one or
    two tiles or straddling tiles, and (2 threads) tasks that start mid-way."""
    k, n = 2048, 64 * 11 + 5
    rng = np.random.default_rng([bits, group, 11])
    weights = int8_weights(k, n, group, bits, axis, False, bits == 4, rng)
    a = rng.standard_normal((2, k)).astype(np.float32)
    for row in a:
        assert_matches_reference(run_kernel(weights, row[None]), weights, row[None])


def adversarial_rows(k: int, rng) -> np.ndarray:
    """Rows that probe the rounding and the edge cases of the spec (kernels/reference.py)."""
    rows = [
        np.zeros(k),  # every block 0: codes 0
        rng.standard_normal(k) * 1e30,  # huge
        rng.standard_normal(k) * 1e-30,  # tiny, normal
        rng.standard_normal(k) * 1e-39,  # subnormal: 1 / scale overflows, codes 0
        np.full(k, -3.0),  # constant: every code -127
        (np.arange(k) % 255 - 127) + 0.5 * (np.arange(k) % 2),  # halves with scale 1: ties to even
        np.where(np.arange(k) % 7 == 0, 1e4, 1e-3) * rng.standard_normal(k),  # one outlier per few channels
    ]
    rows.append(rng.standard_normal(k))
    rows[-1][k // 2] = np.nan
    rows.append(rng.standard_normal(k))
    rows[-1][-1] = -np.inf
    rows.append(rng.standard_normal(k))
    rows[-1][0] = 3.4e38  # finite, but x * s may overflow per-IC
    return np.asarray(rows, dtype=np.float32)


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("bits", BITS)
def test_adversarial_rows(ops_library, isa, axis, bits):
    """Zeros, huge, tiny and subnormal rows, ties, NaN and Inf in one block: the oracle's semantics, row by row
    (M = 1) and together (the batched paths)."""
    rng = np.random.default_rng([bits, 77])
    for k, n, group in [(300, 130, 64), (131, 67, 13)]:
        weights = int8_weights(k, n, group, bits, axis, False, True, rng)
        a = adversarial_rows(k, rng)
        assert_matches_reference(run_kernel(weights, a), weights, a)
        for row in a:
            assert_matches_reference(run_kernel(weights, row[None]), weights, row[None])


@pytest.mark.parametrize("axis", AXES)
def test_non_finite_block_makes_its_columns_nan(ops_library, isa, axis):
    """A NaN in one per-OC block makes the row's outputs NaN and leaves the other rows alone."""
    rng = np.random.default_rng(5)
    weights = int8_weights(256, 70, 64, 4, axis, False, False, rng)
    a = rng.standard_normal((3, 256)).astype(np.float32)
    a[1, 200] = np.nan
    y = run_kernel(weights, a)
    assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()


@pytest.mark.parametrize("shape", SHAPES[3:6], ids=lambda s: "K{}xN{}g{}".format(*s))
@pytest.mark.parametrize("axis", AXES)
def test_outliers_permutation_and_bias(ops_library, isa, shape, axis):
    """The sparse outliers stay float (the activations are quantized for the packed weight only)."""
    k, n, group = shape
    rng = np.random.default_rng([k, n, group, 11])
    weights = add_outliers(int8_weights(k, n, group, 3, axis, False, True, rng), 0.02, rng, crowded=axis == "ic")
    a = rng.standard_normal((17, k)).astype(np.float32)
    for batch in (1, 4, 17):
        assert_matches_reference(run_kernel(weights, a[:batch]), weights, a[:batch])


def test_option_changes_the_result(ops_library):
    """The attribute is read: the int8 result differs from the float one by the activations' rounding."""
    rng = np.random.default_rng(2)
    weights = int8_weights(256, 64, 128, 4, "oc", False, False, rng)
    a = rng.standard_normal((2, 256)).astype(np.float32)
    float_y = run_kernel(dataclasses.replace(weights, int8_activations=False), a)
    int8_y = run_kernel(weights, a)
    assert not np.allclose(int8_y, float_y, rtol=1e-5, atol=0)
    np.testing.assert_allclose(int8_y, float_y, rtol=0, atol=0.05 * np.abs(float_y).max())


@pytest.mark.parametrize("value", [2, -1])
def test_attribute_must_be_0_or_1(ops_library, value):
    weights = int8_weights(8, 8, 4, 4, "oc", False, False, np.random.default_rng(0))
    model = quant_matmul_model(weights, (1, 8))
    model.graph.node[0].attribute[-1].i = value
    with pytest.raises(Exception, match="int8_activations must be 0 or 1"):
        ort.InferenceSession(model.SerializeToString(), session_options(1, use_lowbit_ops=True))


def test_oracle_rejects_other_values():
    weights = int8_weights(8, 8, 4, 4, "oc", False, False, np.random.default_rng(0))
    with pytest.raises(ValueError, match="int8_activations must be 0 or 1"):
        reference.quant_matmul(
            np.ones((1, 8), np.float32), *weights.inputs(), **(weights.attributes | {"int8_activations": 3})
        )


# -- the oracle's laws -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "group_size", "axis", "expected"),
    [
        (300, 64, 0, [(0, 64), (64, 128), (128, 192), (192, 256), (256, 300)]),
        (300, 200, 0, [(0, 128), (128, 200), (200, 300)]),  # a block never straddles a group
        (300, 13, 1, [(0, 128), (128, 256), (256, 300)]),  # per-IC: K alone
        (5, 2, 0, [(0, 2), (2, 4), (4, 5)]),
    ],
)
def test_activation_blocks(k, group_size, axis, expected):
    assert reference.activation_blocks(k, group_size, axis) == expected


finite_rows = st.lists(
    st.floats(-1e6, 1e6, allow_nan=False, width=32) | st.sampled_from([0.0, 1e-20, -1e-20]), min_size=1, max_size=300
)


@settings(max_examples=60, deadline=None)
@given(row=finite_rows, group_size=st.integers(1, 200))
def test_quantized_activations_are_within_half_a_step(row, group_size):
    """Per block: |X| <= 127, the largest |X| is 127 (unless the block rounds to zeros), and a * X is within
    a / 2 of the activation (up to float32 rounding of the scale); a block too small for 1 / a (largest
    magnitude below 127 * 2**-128) has codes 0."""
    x = np.asarray(row, np.float32)[None]
    blocks = reference.activation_blocks(x.shape[1], group_size, 0)
    codes, scales = reference.quantize_activations(x, blocks)
    assert np.abs(codes).max() <= reference.INT8_LIMIT
    for i, (k0, k1) in enumerate(blocks):
        block, scale = codes[0, k0:k1], np.float64(scales[0, i])
        if np.abs(x[0, k0:k1]).max() < reference.INT8_LIMIT * 2.0**-128:
            assert not np.any(block)
            continue
        assert np.abs(block).max() == reference.INT8_LIMIT
        error = np.abs(scale * block - x[0, k0:k1].astype(np.float64))
        assert np.all(error <= scale * (0.5 + 1e-5))


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 150),
    n=st.integers(1, 70),
    group_size=st.integers(1, 160),
    axis=st.sampled_from([0, 1]),
    bits=st.sampled_from(BITS),
    seed=st.integers(0, 2**16),
)
def test_oracle_error_is_bounded_by_the_rounding(k, n, group_size, axis, bits, seed):
    """|int8 result - float result| <= sum over blocks of a / 2 times the block's |W| (per-IC: |q - z|, the
    scale being in the activation): the whole error is the activations' rounding."""
    rng = np.random.default_rng(seed)
    shape = reference.params_shape(axis, group_size, k, n)
    codes = rng.integers(0, 1 << bits, (k, n)).astype(np.uint8)
    scales = (rng.random(shape) + 0.01).astype(np.float32)
    zero_points = rng.integers(0, 1 << bits, shape).astype(np.uint8)
    attributes = {"bits": bits, "group_size": group_size, "group_axis": axis, "K": k, "N": n}
    packed = packing.pack(codes, bits)
    a = (rng.standard_normal((3, k)) * rng.choice([1e-3, 1, 1e3], (3, 1))).astype(np.float32)
    exact = reference.quant_matmul(a, packed, scales, zero_points, **attributes).astype(np.float64)
    int8 = reference.quant_matmul(a, packed, scales, zero_points, **attributes, int8_activations=1)
    blocks = reference.activation_blocks(k, group_size, axis)
    shifted = np.abs(codes.astype(np.float64) - np.repeat(zero_points, group_size, axis)[:k, :n])
    bound = np.zeros_like(exact)
    columns = [slice(0, n)] if axis == 0 else [slice(j, j + group_size) for j in range(0, n, group_size)]
    for j, cols in enumerate(columns):
        xs = a if axis == 0 else a * scales[:, j].astype(np.float32)
        _, x_scales = reference.quantize_activations(xs, blocks)
        for i, (k0, k1) in enumerate(blocks):
            w = shifted[k0:k1, cols] * (np.abs(scales[k0 // group_size, cols]) if axis == 0 else 1.0)
            bound[:, cols] += x_scales[:, i, None] / 2 * w.sum(axis=0)
    magnitude = np.abs(a.astype(np.float64)) @ np.abs(
        reference.dequantize(codes, scales, zero_points, bits=bits, group_size=group_size, group_axis=axis)
    )
    assert np.all(np.abs(int8 - exact) <= bound * (1 + 1e-5) + 1e-5 * magnitude + 1e-30)


def test_integer_activations_lose_nothing():
    """Activations that are int8 codes already (each block holding a +-127, so its scale is 1) are kept exactly."""
    rng = np.random.default_rng(4)
    k, n = 256, 40
    a = rng.integers(-127, 128, (4, k)).astype(np.float32)
    a[:, ::64] = 127  # every per-OC block (group 64) and per-IC block (128) holds 127
    codes = rng.integers(0, 16, (k, n)).astype(np.uint8)
    for axis in (0, 1):
        shape = reference.params_shape(axis, 64, k, n)
        scales = np.ones(shape, np.float32)  # per-IC: x * s = x
        zero_points = rng.integers(0, 16, shape).astype(np.uint8)
        attributes = {"bits": 4, "group_size": 64, "group_axis": axis, "K": k, "N": n}
        packed = packing.pack(codes, 4)
        exact = reference.quant_matmul(a, packed, scales, zero_points, **attributes)
        np.testing.assert_array_equal(
            reference.quant_matmul(a, packed, scales, zero_points, **attributes, int8_activations=1), exact
        )
