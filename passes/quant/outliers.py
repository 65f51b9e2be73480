"""Outlier handling before quantization, pure NumPy, no graph code.

* **Dense-and-sparse** (SqueezeLLM): the top ``fraction`` of a ``[K, N]`` weight's entries, ranked by
  magnitude ``|w|`` or by sensitivity ``H_kk * w**2`` (``H = X^T X`` of the weight's input), move to an
  exact float32 sparse matrix; the dense remainder has zeros in their place. Zeros lie inside every
  group's range (asymmetric ranges always include 0; symmetric ones are set by ``max |w|``), so removing
  the outliers only narrows the ranges the dense part is quantized with, and a zero is reconstructed
  exactly.
* **Layer split** (SplitQuant): 1-D k-means (k = 3) on the weight's values cuts it into lower, middle and
  upper clusters; each becomes a weight of its own (zeros elsewhere), quantized with its own ranges, and
  the three products are summed.

Both decompositions are exact: ``dense + sparse`` and ``low + middle + high`` equal the weight bit for bit,
since every entry is non-zero in at most one part.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lowbit.passes.quant.adadim import relative_output_error
from lowbit.passes.quant.rtn import quantize_rtn, relative_error
from lowbit.passes.quant.scheme import OUTLIER_CRITERIA, QuantScheme

CRITERIA = OUTLIER_CRITERIA


@dataclasses.dataclass
class SparseOutliers:
    """The entries of a ``[K, N]`` weight kept in float32, in column-major order (sorted by ``(col, row)``):
    ``rows``, ``values`` and ``column_pointers()`` are its CSC form, one output channel after the other."""

    rows: np.ndarray  # int64 [nnz], input channel k of each entry
    cols: np.ndarray  # int64 [nnz], output channel n of each entry
    values: np.ndarray  # float32 [nnz]
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return len(self.values)

    def column_pointers(self) -> np.ndarray:
        """int64 ``[N + 1]``: the entries of output channel ``n`` are ``start[n]:start[n + 1]``."""
        counts = np.bincount(self.cols, minlength=self.shape[1])
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def to_dense(self) -> np.ndarray:
        dense = np.zeros(self.shape, dtype=np.float32)
        dense[self.rows, self.cols] = self.values
        return dense


def outlier_scores(weight: np.ndarray, criterion: str, diagonal: np.ndarray | None = None) -> np.ndarray:
    """Per-entry score, larger = more worth keeping exact: ``|w|`` or ``H_kk * w**2`` (float64); ``diagonal``:
    ``diag(H)`` of the weight's input, ``H = X^T X``."""
    weight = np.asarray(weight, dtype=np.float64)
    if criterion == "magnitude":
        return np.abs(weight)
    if criterion == "sensitivity":
        if diagonal is None:
            raise ValueError(
                "the sensitivity criterion needs the diagonal of the Hessian H = X^T X of the weight's input"
            )
        if np.shape(diagonal) != (weight.shape[0],):
            raise ValueError(
                f"Hessian diagonal of shape {np.shape(diagonal)} does not match a weight of shape {weight.shape}"
            )
        return np.asarray(diagonal, dtype=np.float64)[:, None] * weight**2
    raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")


def outlier_count(size: int, fraction: float) -> int:
    """How many of ``size`` entries a ``fraction`` keeps (rounded, at most ``size``)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"outlier fraction must be in [0, 1), got {fraction}")
    return min(size, int(round(fraction * size)))


def split_dense_sparse(weight: np.ndarray, scores: np.ndarray, fraction: float) -> tuple[np.ndarray, SparseOutliers]:
    """``(dense, sparse)`` with the top ``fraction`` of entries by ``scores`` in ``sparse``, zeros in ``dense``.

    Entries with a zero value are never taken (they need no float copy). Ties at the cut are broken
    deterministically (NumPy's introselect on the same input).
    """
    weight = np.asarray(weight, dtype=np.float32)
    if weight.ndim != 2 or scores.shape != weight.shape:
        raise ValueError(f"expected a 2-D weight and scores of its shape, got {weight.shape} and {scores.shape}")
    count = outlier_count(weight.size, fraction)
    count = min(count, int(np.count_nonzero(weight)))
    flat_scores = np.where(weight.ravel() != 0, scores.ravel(), -np.inf)
    chosen = (
        np.argpartition(flat_scores, weight.size - count)[weight.size - count :] if count else np.zeros(0, np.int64)
    )
    rows, cols = np.unravel_index(chosen, weight.shape)
    order = np.lexsort((rows, cols))
    rows, cols, chosen = rows[order], cols[order], chosen[order]
    dense = weight.copy()
    dense.ravel()[chosen] = 0.0
    sparse = SparseOutliers(rows.astype(np.int64), cols.astype(np.int64), weight.ravel()[chosen], tuple(weight.shape))
    return dense, sparse


def kmeans_1d(values: np.ndarray, clusters: int = 3, iterations: int = 100) -> np.ndarray:
    """Sorted centroids of 1-D k-means (Lloyd) on ``values``, started at evenly spaced quantiles.

    Deterministic. Works on the sorted values, where every cluster is a contiguous run; a cluster that
    empties keeps its previous centroid. Each mean is clipped into its run (float rounding of a sum can
    step past it), which keeps the centroids sorted.
    """
    ordered = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if ordered.size == 0:
        raise ValueError("k-means needs at least one value")
    centroids = np.quantile(ordered, (np.arange(clusters) + 0.5) / clusters)
    for _ in range(iterations):
        bounds = np.concatenate([[0], np.searchsorted(ordered, (centroids[1:] + centroids[:-1]) / 2), [ordered.size]])
        updated = centroids.copy()
        for cluster, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            if stop > start:
                updated[cluster] = np.clip(ordered[start:stop].mean(), ordered[start], ordered[stop - 1])
        if np.array_equal(updated, centroids):
            break
        centroids = updated
    return centroids


def cluster_bounds(weight: np.ndarray, clusters: int = 3) -> np.ndarray:
    """The ``clusters - 1`` value bounds between the clusters of 1-D k-means on the weight's values (``cluster_labels``)."""
    centroids = kmeans_1d(np.asarray(weight, dtype=np.float32), clusters)
    return (centroids[1:] + centroids[:-1]) / 2


def cluster_labels(weight: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Each entry's cluster (0 = lowest values) under ``bounds`` (``cluster_bounds``)."""
    return np.searchsorted(bounds, np.asarray(weight, dtype=np.float64), side="right")


def cluster_part(weight: np.ndarray, bounds: np.ndarray, cluster: int) -> np.ndarray:
    """The entries of ``weight`` in ``cluster`` (``cluster_labels``), zeros elsewhere."""
    return np.where(cluster_labels(weight, bounds) == cluster, weight, np.zeros((), weight.dtype))


def cluster_parts(weight: np.ndarray, bounds: np.ndarray) -> list[np.ndarray]:
    """Every ``cluster_part`` of ``weight``, lowest cluster first: they sum to the weight exactly."""
    labels = cluster_labels(weight, bounds)
    return [np.where(labels == cluster, weight, np.zeros((), weight.dtype)) for cluster in range(len(bounds) + 1)]


def split_clusters(weight: np.ndarray, clusters: int = 3) -> list[np.ndarray]:
    """The weight cut into ``clusters`` parts by 1-D k-means on its values (``cluster_parts``)."""
    weight = np.asarray(weight, dtype=np.float32)
    return cluster_parts(weight, cluster_bounds(weight, clusters))


def quantization_error(
    weight: np.ndarray, parts: list[np.ndarray], scheme: QuantScheme, hessian: np.ndarray | None
) -> float:
    """Error of quantizing each part with RTN under ``scheme`` and summing: relative output error
    ``trace(dW^T H dW) / trace(W^T H W)`` with a Hessian, else relative Frobenius weight error."""
    approx = sum(quantize_rtn(part, scheme).dequantize() for part in parts)
    if hessian is not None:
        return relative_output_error(weight, approx, hessian)
    return relative_error(weight, approx)
