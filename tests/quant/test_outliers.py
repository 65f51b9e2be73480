"""Dense-and-sparse and layer-split math: exact decompositions (hypothesis), top-k choice, k-means."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lowbit.passes.quant import outliers
from lowbit.passes.quant.adadim import relative_output_error
from lowbit.passes.quant.rtn import quantize_rtn, relative_error
from lowbit.passes.quant.scheme import QuantScheme

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
weights = st.integers(1, 24).flatmap(
    lambda k: st.integers(1, 24).flatmap(lambda n: arrays(np.float32, (k, n), elements=finite))
)
fractions = st.floats(0.0, 0.99)


@settings(max_examples=200, deadline=None)
@given(weights, fractions)
def test_dense_plus_sparse_is_the_weight_bit_for_bit(weight, fraction):
    dense, sparse = outliers.split_dense_sparse(weight, outliers.outlier_scores(weight, "magnitude"), fraction)
    np.testing.assert_array_equal(dense + sparse.to_dense(), weight)
    assert sparse.nnz == min(outliers.outlier_count(weight.size, fraction), np.count_nonzero(weight))
    assert np.all(dense[sparse.rows, sparse.cols] == 0)
    assert np.all(sparse.values != 0)
    order = sparse.cols * weight.shape[0] + sparse.rows
    assert np.all(np.diff(order) > 0)  # column-major, no duplicates
    pointers = sparse.column_pointers()
    assert pointers[0] == 0 and pointers[-1] == sparse.nnz and len(pointers) == weight.shape[1] + 1
    for column in range(weight.shape[1]):
        assert np.all(sparse.cols[pointers[column] : pointers[column + 1]] == column)


@settings(max_examples=200, deadline=None)
@given(weights, fractions)
def test_kept_entries_outrank_every_entry_left_in_the_dense_part(weight, fraction):
    scores = outliers.outlier_scores(weight, "magnitude")
    dense, sparse = outliers.split_dense_sparse(weight, scores, fraction)
    if sparse.nnz and np.count_nonzero(dense):
        assert scores[sparse.rows, sparse.cols].min() >= np.abs(dense).max()


@settings(max_examples=200, deadline=None)
@given(weights, fractions, st.booleans(), st.sampled_from(["oc", "ic"]))
def test_removing_outliers_never_widens_a_group_range(weight, fraction, symmetric, axis):
    """The zeros left behind lie inside every group's range: each group's scale can only shrink."""
    dense, _ = outliers.split_dense_sparse(weight, outliers.outlier_scores(weight, "magnitude"), fraction)
    scheme = QuantScheme(3, 4, axis, symmetric)
    before, after = quantize_rtn(weight, scheme).scales, quantize_rtn(dense, scheme).scales
    widened = (after > before) & (after != 1.0)  # 1.0 is the placeholder scale of an all-zero group
    assert not widened.any()


def test_sensitivity_ranks_by_input_energy_times_squared_weight():
    weight = np.array([[1.0, -3.0], [2.0, 0.5]], np.float32)
    diagonal = np.array([10.0, 1.0])  # input channel 0 carries 10x the energy
    scores = outliers.outlier_scores(weight, "sensitivity", diagonal)
    np.testing.assert_allclose(scores, [[10.0, 90.0], [4.0, 0.25]])
    _, by_sensitivity = outliers.split_dense_sparse(weight, scores, 0.5)
    _, by_magnitude = outliers.split_dense_sparse(weight, outliers.outlier_scores(weight, "magnitude"), 0.5)
    assert list(zip(by_sensitivity.rows, by_sensitivity.cols)) == [(0, 0), (0, 1)]
    assert list(zip(by_magnitude.rows, by_magnitude.cols)) == [(1, 0), (0, 1)]  # column-major


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda w: outliers.outlier_scores(w, "sensitivity"), "needs the diagonal of the Hessian"),
        (lambda w: outliers.outlier_scores(w, "sensitivity", np.ones(3)), "does not match"),
        (lambda w: outliers.outlier_scores(w, "size"), "criterion must be one of"),
        (lambda w: outliers.split_dense_sparse(w, np.abs(w), 1.0), r"fraction must be in \[0, 1\)"),
        (lambda w: outliers.split_dense_sparse(w, np.abs(w), -0.1), r"fraction must be in \[0, 1\)"),
        (lambda w: outliers.split_dense_sparse(w, np.abs(w[:1]), 0.1), "scores of its shape"),
    ],
)
def test_bad_arguments_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call(np.ones((4, 2), np.float32))


def test_kmeans_recovers_three_separated_clusters():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(-5, 0.1, 50), rng.normal(0, 0.1, 500), rng.normal(4, 0.1, 30)])
    centroids = outliers.kmeans_1d(rng.permutation(values))
    np.testing.assert_allclose(centroids, [values[:50].mean(), values[50:550].mean(), values[550:].mean()], rtol=1e-9)


@settings(max_examples=200, deadline=None)
@given(arrays(np.float32, st.integers(1, 300), elements=finite))
def test_kmeans_is_a_fixed_point_of_lloyd(values):
    """Every non-empty cluster's centroid is the mean of the values nearest to it; centroids are sorted."""
    centroids = outliers.kmeans_1d(values)
    assert np.all(np.diff(centroids) >= 0)
    labels = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, values.astype(np.float64), side="right")
    for cluster in np.unique(labels):
        np.testing.assert_allclose(
            values[labels == cluster].astype(np.float64).mean(), centroids[cluster], rtol=1e-9, atol=1e-6
        )


@settings(max_examples=200, deadline=None)
@given(weights)
def test_split_parts_sum_to_the_weight_and_are_ordered_clusters(weight):
    parts = outliers.split_clusters(weight)
    assert len(parts) == 3
    np.testing.assert_array_equal(parts[0] + parts[1] + parts[2], weight)
    bounds = outliers.cluster_bounds(weight)
    for cluster, part in enumerate(parts):  # one part alone, from the bounds (what the split model computes)
        np.testing.assert_array_equal(outliers.cluster_part(weight, bounds, cluster), part)
    support = [part != 0 for part in parts]
    assert not np.any((support[0] & support[1]) | (support[1] & support[2]) | (support[0] & support[2]))
    members = [part[mask] for part, mask in zip(parts, support)]
    for lower, upper in zip(members, members[1:]):
        if lower.size and upper.size:
            assert lower.max() <= upper.min()


def test_split_lowers_the_error_of_a_heavy_tailed_weight():
    weight = np.random.default_rng(0).standard_t(3, (64, 48)).astype(np.float32)
    scheme = QuantScheme(3, 16, "oc")
    base = outliers.quantization_error(weight, [weight], scheme, None)
    split = outliers.quantization_error(weight, outliers.split_clusters(weight), scheme, None)
    assert base == pytest.approx(relative_error(weight, quantize_rtn(weight, scheme).dequantize()))
    assert split < base / 2


def test_quantization_error_with_a_hessian_is_the_relative_output_error():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((16, 8)).astype(np.float32)
    x = rng.standard_normal((40, 16))
    hessian = x.T @ x
    parts = outliers.split_clusters(weight)
    scheme = QuantScheme(2, 8, "ic")
    expected = relative_output_error(weight, sum(quantize_rtn(p, scheme).dequantize() for p in parts), hessian)
    assert outliers.quantization_error(weight, parts, scheme, hessian) == pytest.approx(expected, rel=1e-12)
