"""Streaming calibration statistics of one weight's input: ``H = X^T X`` and per-channel magnitudes.

Memory is O(K^2) whatever the number of tokens: each batch is folded into running sums and dropped.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import blas

#: Rows of float32 (or float16) activations whose products are summed in float32 before that sum joins H's float64
#: total, whatever the sizes of the updates that bring them: BLAS runs at float32 speed and adds into its float32
#: sum in place, while every float32 sum stays short (its rounding error grows with its length).
FLOAT32_ROWS = 4096


class HessianAccumulator:
    """Accumulates ``H = X^T X`` (or only its diagonal), per-channel abs-max and sum of ``|x|``, and the token count.

    H is a float64 total of symmetric rank-k updates: the products of float32 activations (ONNX Runtime's) are
    summed in float32 (what the GPTQ reference does for all of H), in a float32 ``[K, K]`` sum of the last rows
    that joins the float64 total every ``FLOAT32_ROWS`` rows and when H is read; float64 and integer activations
    are multiplied and summed in float64. Reading H between updates ends the float32 sum there.
    ``update`` takes activations of any leading shape ``[..., K]``; every leading index is a token.

    ``diagonal_only``: only ``diag(H)``, the per-channel sum of ``x**2`` (float64 sums of the exact squares of the
    activations), for a reader that needs no more (the outlier ranking ``H_kk * w**2``): ``K`` floats, not ``K^2``.
    """

    def __init__(self, channels: int, *, diagonal_only: bool = False) -> None:
        if channels < 1:
            raise ValueError(f"channels must be positive, got {channels}")
        self.channels = channels
        self.diagonal_only = diagonal_only
        self._square_sum = np.zeros(channels, dtype=np.float64) if diagonal_only else None
        # Updates add to the upper triangle only (a symmetric rank-k update does half a GEMM's work);
        # reading ``hessian`` mirrors it into the lower one, in place. Fortran order lets BLAS update in place.
        self._matrix = None if diagonal_only else np.zeros((channels, channels), dtype=np.float64, order="F")
        self._mirrored = True
        # The float32 sum of the products of the last ``_pending_rows`` float32 rows (upper triangle), not yet in
        # ``_matrix``; allocated by the first float32 update after H was last read.
        self._pending: np.ndarray | None = None
        self._pending_rows = 0
        self.abs_max = np.zeros(channels, dtype=np.float64)
        self.abs_sum = np.zeros(channels, dtype=np.float64)
        self.tokens = 0

    def update(self, x: np.ndarray) -> None:
        """Fold a batch of activations ``[..., K]`` into the statistics."""
        x = np.asarray(x)
        if x.ndim < 1 or x.shape[-1] != self.channels:
            raise ValueError(f"expected activations [..., {self.channels}], got shape {x.shape}")
        flat = x.reshape(-1, self.channels)
        if not np.issubdtype(flat.dtype, np.floating):  # |x| of an integer type can overflow
            flat = flat.astype(np.float64)
        if len(flat) == 0:
            return
        # The magnitudes in the activations' own type (float32 from ONNX Runtime): |x| and the maximum are exact in
        # it, and the sum is accumulated in float64, so the statistics are those of float64 passes at a fraction of
        # their cost. A NaN or an infinity anywhere shows in its column's maximum: checked before anything changes.
        magnitudes = np.abs(flat)
        column_max = magnitudes.max(axis=0)
        if not np.isfinite(column_max).all():
            raise ValueError("activations contain NaN or Inf")
        if self.diagonal_only:
            self._square_sum += np.einsum("tk,tk->k", flat, flat, dtype=np.float64)
        else:
            matrix = self._kept_matrix()
            if flat.dtype.itemsize <= 4:
                self._add_float32_products(flat.astype(np.float32, copy=False))
            else:  # upper(H) += upper(X^T X): BLAS syrk on X^T (a Fortran-ordered view of X, no copy)
                self._matrix = blas.dsyrk(
                    1.0, flat.astype(np.float64).T, beta=1.0, c=matrix, trans=0, lower=0, overwrite_c=1
                )
        self._mirrored = False
        np.maximum(self.abs_max, column_max, out=self.abs_max)
        self.abs_sum += magnitudes.sum(axis=0, dtype=np.float64)
        self.tokens += len(flat)

    def _add_float32_products(self, tokens: np.ndarray) -> None:
        """Add upper(``tokens^T tokens``) to the float32 sum (BLAS ssyrk, in place), moving that sum into the
        float64 total each time it holds ``FLOAT32_ROWS`` rows."""
        start = 0
        while start < len(tokens):
            if self._pending_rows == FLOAT32_ROWS:
                self._end_float32_sum()
            if self._pending is None:  # syrk never writes below the diagonal: the lower triangle stays 0
                self._pending = np.zeros((self.channels, self.channels), dtype=np.float32, order="F")
            rows = tokens[start : start + FLOAT32_ROWS - self._pending_rows]
            beta = 1.0 if self._pending_rows else 0.0  # 0: the sum starts over (the old one is in the total)
            self._pending = blas.ssyrk(1.0, rows.T, beta=beta, c=self._pending, trans=0, lower=0, overwrite_c=1)
            self._pending_rows += len(rows)
            start += len(rows)

    def _end_float32_sum(self) -> None:
        """Add the float32 sum of the last rows into the float64 total."""
        if self._pending_rows:
            np.add(self._matrix, self._pending, out=self._matrix)
            self._pending_rows = 0

    @property
    def hessian(self) -> np.ndarray:
        """``H = X^T X`` [K, K] float64, symmetric (the lower triangle is refreshed from the upper one after updates)."""
        self._kept_matrix()
        self._end_float32_sum()
        self._pending = None  # read once the updates are done: no need to keep the float32 sum's memory
        if not self._mirrored:
            _mirror_upper_triangle(self._matrix)
            self._mirrored = True
        return self._matrix

    @hessian.setter
    def hessian(self, value: np.ndarray) -> None:
        value = np.array(value, dtype=np.float64, order="F")  # a copy, in the layout BLAS updates in place
        if value.shape != (self.channels, self.channels):
            raise ValueError(f"hessian must be [{self.channels}, {self.channels}], got shape {value.shape}")
        self._matrix, self.diagonal_only, self._square_sum = value, False, None
        self._pending, self._pending_rows = None, 0  # rows before the assignment are not part of it
        self._mirrored = False  # the upper triangle is what counts, as after an update

    def release(self) -> None:
        """Drop H (the ``[K, K]`` matrix) once nothing will read it again; the magnitudes and token count stay."""
        self._matrix = None
        self._pending, self._pending_rows = None, 0

    @property
    def diagonal(self) -> np.ndarray:
        """``diag(H)`` [K] float64."""
        return self._square_sum if self.diagonal_only else np.diagonal(self.hessian)

    def _kept_matrix(self) -> np.ndarray:
        if self.diagonal_only:
            raise ValueError(
                f"only the diagonal of H was collected for these {self.channels} channels (diagonal_only): "
                "collect the full statistics for a reader of H"
            )
        if self._matrix is None:
            raise RuntimeError("H was released (HessianAccumulator.release): it cannot be read or updated")
        return self._matrix

    @property
    def mean_abs(self) -> np.ndarray:
        """Per-channel mean ``|x|`` over all tokens seen (zeros before any token)."""
        return self.abs_sum / max(self.tokens, 1)


def _mirror_upper_triangle(matrix: np.ndarray, block: int = 256) -> None:
    """Copy the upper triangle of a square matrix onto its lower one, ``block`` columns at a time (temporaries
    of ``block`` rows, not of the whole matrix)."""
    channels = len(matrix)
    for start in range(0, channels, block):
        stop = min(start + block, channels)
        matrix[stop:, start:stop] = matrix[start:stop, stop:].T
        square = matrix[start:stop, start:stop]
        np.copyto(square, square.T.copy(), where=np.tri(stop - start, k=-1, dtype=bool))
