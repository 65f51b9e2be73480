"""The NumPy oracle of lowbit::QuantMatMul against a plain dequantize-then-matmul of the RTN weight."""

import numpy as np
import pytest

from lowbit.kernels import reference
from lowbit.kernels.model import QuantMatMulWeights
from lowbit.passes.quant.rtn import quantize_rtn
from lowbit.passes.quant.scheme import SUPPORTED_BITS, QuantScheme

SCHEMES = [
    QuantScheme(bits=bits, group_size=group, group_axis=axis, symmetric=symmetric)
    for bits in SUPPORTED_BITS
    for axis in ("oc", "ic")
    for symmetric in (False, True)
    for group in (16, 7, -1)
]


def run(weights: QuantMatMulWeights, a: np.ndarray) -> np.ndarray:
    return reference.quant_matmul(a, *weights.inputs(), **weights.attributes)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_matches_dequantize_then_matmul(scheme):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((37, 70)).astype(np.float32)
    quantized = quantize_rtn(weight, scheme)
    perm = rng.permutation(37)
    bias = rng.standard_normal(70).astype(np.float32)
    a = rng.standard_normal((2, 3, 37)).astype(np.float32)
    expected = a[..., perm].astype(np.float64) @ quantized.dequantize().astype(np.float64) + bias
    y = run(QuantMatMulWeights.from_quantized(quantized, perm, bias), a)
    assert y.dtype == np.float32 and y.shape == (2, 3, 70)
    np.testing.assert_allclose(y, expected.astype(np.float32), rtol=1e-6, atol=1e-6)


def test_absent_zero_points_mean_the_mid_point():
    weight = np.random.default_rng(1).standard_normal((16, 8))
    quantized = quantize_rtn(weight, QuantScheme(bits=3, group_size=8, symmetric=True))
    weights = QuantMatMulWeights.from_quantized(quantized)
    assert weights.zero_points is None
    a = np.eye(16, dtype=np.float32)
    np.testing.assert_array_equal(run(weights, a), quantized.dequantize())


def test_non_finite_activations_propagate_like_a_dense_matmul():
    weight = np.array([[0.0, 1.0], [1.0, -1.0]], np.float32)
    quantized = quantize_rtn(weight, QuantScheme(bits=4, group_size=2, group_axis="ic"))
    weights = QuantMatMulWeights.from_quantized(quantized)
    y = run(weights, np.array([[np.inf, 1.0], [np.nan, 0.0], [1.0, np.inf]], np.float32))
    assert np.isnan(y[0, 0]) and y[0, 1] == np.inf  # inf * 0 = nan
    assert np.isnan(y[1]).all()
    assert y[2, 0] == np.inf and y[2, 1] == -np.inf


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(scales=np.ones((3, 3), np.float32)), "scales must have shape"),
        (dict(perm=np.array([0, 4, 1, 2])), "perm must be"),
        (dict(group_size=0), "group_size"),
    ],
)
def test_rejects_inconsistent_inputs(change, message):
    quantized = quantize_rtn(np.ones((4, 4), np.float32), QuantScheme(bits=4, group_size=2))
    inputs = QuantMatMulWeights.from_quantized(quantized).inputs()
    kwargs = dict(zip(("packed", "scales", "zero_points", "perm", "bias"), inputs))
    kwargs.update(bits=4, group_size=2, group_axis=0, K=4, N=4)
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        reference.quant_matmul(np.ones((1, 4), np.float32), **kwargs)


def test_sparse_outliers_add_a_dense_product_with_repeats_summed():
    rng = np.random.default_rng(2)
    quantized = quantize_rtn(
        rng.standard_normal((9, 5)).astype(np.float32), QuantScheme(bits=3, group_size=4, group_axis="ic")
    )
    perm = rng.permutation(9)
    rows, columns = np.array([0, 8, 8, 3, 3]), np.array([0, 0, 0, 2, 4])  # (8, 0) twice: the values add up
    values = np.array([5.0, -2.0, 0.5, 1e4, 7.0], np.float32)
    dense = np.zeros((9, 5), np.float64)
    np.add.at(dense, (rows, columns), values)
    pointers = np.array([0, 3, 3, 4, 4, 5], np.uint32)
    weights = QuantMatMulWeights.from_quantized(quantized, perm)
    weights.outliers = (pointers, rows.astype(np.uint16), values)
    a = rng.standard_normal((2, 3, 9)).astype(np.float32)
    x = a[..., perm].astype(np.float64)
    expected = (x @ quantized.dequantize().astype(np.float64)).astype(np.float32) + (x @ dense).astype(np.float32)
    np.testing.assert_array_equal(run(weights, a), expected)


@pytest.mark.parametrize(
    "pointers, rows, message",
    [
        ([0, 1, 2], [0], "from 0 to nnz"),
        ([0, 2, 1], [0, 1], "never decreasing"),
        ([0, 1, 2], [0, 4], r"rows in \[0, 4\)"),
    ],
)
def test_outliers_must_be_a_valid_csc_matrix(pointers, rows, message):
    quantized = quantize_rtn(np.ones((4, 2), np.float32), QuantScheme(bits=4, group_size=2))
    weights = QuantMatMulWeights.from_quantized(quantized)
    weights.outliers = (np.array(pointers, np.uint32), np.array(rows, np.uint16), np.ones(len(rows), np.float32))
    with pytest.raises(ValueError, match=message):
        run(weights, np.ones((1, 4), np.float32))
