"""Shared cases of the kernel tests: weights, adversarial shapes, and the comparison with the reference.

Tolerance: NaN/Inf exactly where the reference (float64 sums) has them, and elsewhere
|y - ref| <= 1e-5 * (|A[..., perm]| @ |W| + |bias|), i.e. relative to the magnitude of the summed terms:
the scale of float32 rounding (a cancelling sum may have a tiny result, and a wrong code or scale errs by
a whole term).
"""

import numpy as np

from lowbit.kernels import packing, reference
from lowbit.kernels.model import QuantMatMulWeights
from lowbit.passes.quant.rtn import quantize_rtn
from lowbit.passes.quant.scheme import SUPPORTED_BITS, QuantScheme

RTOL = 1e-5
BITS = SUPPORTED_BITS
AXES = ("oc", "ic")
#: (K, N, group_size): ragged tails, K or N = 1, groups smaller than a vector, not a multiple of 8, one group.
SHAPES = [
    (1, 1, 1),
    (1, 70, 64),
    (70, 1, 32),
    (200, 130, 64),
    (131, 67, 13),
    (64, 100, 16),
    (96, 200, 8),
    (256, 192, 128),
    (50, 77, 1000),
]


def make_weights(weight, bits, group, axis, symmetric, extras, rng, scale_dtype="float32") -> QuantMatMulWeights:
    """RTN-quantized ``weight`` as the op's inputs; ``extras``: with a permutation and a bias; ``scale_dtype``
    float16: scales rounded to float16 values, which the inputs then store as float16."""
    scheme = QuantScheme(bits=bits, group_size=group, group_axis=axis, symmetric=symmetric, scale_dtype=scale_dtype)
    quantized = quantize_rtn(weight, scheme)
    k, n = weight.shape
    perm = rng.permutation(k).astype(np.int64) if extras else None
    bias = rng.standard_normal(n).astype(np.float32) if extras else None
    return QuantMatMulWeights.from_quantized(quantized, perm, bias)


def add_outliers(weights: QuantMatMulWeights, fraction: float, rng, crowded: bool = False) -> QuantMatMulWeights:
    """Give ``weights`` random CSC outliers (about ``fraction`` of K*N, some huge); ``crowded``: most of them
    in one output channel, with repeated positions (their values add up)."""
    k, n = weights.K, weights.N
    nnz = max(1, round(fraction * k * n))
    columns = np.where(rng.random(nnz) < 0.7, n // 2, rng.integers(0, n, nnz)) if crowded else rng.integers(0, n, nnz)
    rows = rng.integers(0, k, nnz) if crowded else rng.integers(0, k, nnz)
    order = np.lexsort((rows, columns))
    values = rng.standard_normal(nnz).astype(np.float32) * np.where(rng.random(nnz) < 0.1, 1e4, 3).astype(np.float32)
    pointers = np.concatenate([[0], np.cumsum(np.bincount(columns, minlength=n))]).astype(np.uint32)
    weights.outliers = (pointers, rows[order].astype(np.uint16), values[order])
    return weights


def term_magnitude(weights: QuantMatMulWeights, a: np.ndarray) -> np.ndarray:
    """``|A[..., perm]| @ (|W| + |S|) + |bias|`` in float64."""
    codes = packing.unpack(weights.packed, weights.bits, weights.K, weights.N)
    w = reference.dequantize(
        codes,
        weights.scales,
        weights.zero_points,
        bits=weights.bits,
        group_size=weights.group_size,
        group_axis=weights.group_axis,
    )
    x = a if weights.perm is None else a[..., weights.perm]
    w = np.abs(w.astype(np.float64))
    if weights.outliers is not None:
        pointers, rows, values = weights.outliers
        np.add.at(
            w,
            (rows.astype(np.int64), np.repeat(np.arange(weights.N), np.diff(pointers.astype(np.int64)))),
            np.abs(values),
        )
    with np.errstate(invalid="ignore", over="ignore"):
        magnitude = np.abs(x.astype(np.float64)) @ w
    return magnitude if weights.bias is None else magnitude + np.abs(weights.bias)


def assert_matches_reference(y: np.ndarray, weights: QuantMatMulWeights, a: np.ndarray) -> None:
    ref = reference.quant_matmul(a, *weights.inputs(), **weights.attributes)
    assert y.shape == ref.shape and y.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    np.testing.assert_array_equal(np.where(np.isinf(ref), ref, 0), np.where(np.isinf(y), y, 0))
    finite = np.isfinite(ref)
    error = np.abs(y[finite].astype(np.float64) - ref[finite])
    bound = RTOL * term_magnitude(weights, a)[finite] + 1e-30
    worst = np.argmax(error / bound) if error.size else 0
    assert np.all(error <= bound), f"error {error[worst]:.3g} > bound {bound[worst]:.3g} (ref {ref[finite][worst]:.3g})"


def adversarial_weights(kind: str, rng) -> np.ndarray:
    weight = rng.standard_normal((130, 72)).astype(np.float32)
    if kind == "zero":
        return np.zeros_like(weight)
    if kind == "constant-groups":
        return np.repeat(np.repeat(rng.standard_normal((5, 3)), 32, axis=0), 32, axis=1)[:130, :72].astype(np.float32)
    weight[rng.integers(0, 130, 6), rng.integers(0, 72, 6)] = 1e4 * np.array([1, -1, 1, -1, 1, -1])  # outliers
    return weight
