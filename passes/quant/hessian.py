"""Streaming calibration statistics of one weight's input: ``H = X^T X`` and per-channel magnitudes.

Memory is O(K^2) whatever the number of tokens: each batch is folded into running sums and dropped.
"""

from __future__ import annotations

import threading

import numpy as np
from scipy.linalg import blas

#: Rows of float32 (or float16) activations whose products are summed in float32 at a time before the sum joins
#: H's float64 total: BLAS runs at float32 speed while every float32 sum stays short (its rounding error grows
#: with its length); what a caller folds in one ``update`` call up to this many rows is one such sum.
FLOAT32_ROWS = 4096

#: Per thread, one float32 ``[K, K]`` buffer per K for those products: a new one per update would be a fresh
#: mapping each time (``runtime.memory.map_large_allocations``), every page of it faulted in again. It lives as
#: long as its thread (calibration folds on threads of their own).
_products = threading.local()


def _float32_product(rows: np.ndarray) -> np.ndarray:
    """upper(``rows^T rows``) in float32 (BLAS ssyrk, in this thread's buffer for its size: valid until the thread's
    next call); the lower triangle is 0."""
    channels = rows.shape[1]
    buffers = _products.__dict__.setdefault("buffers", {})
    if channels not in buffers:
        buffers[channels] = np.zeros((channels, channels), dtype=np.float32, order="F")  # syrk never writes below
    return blas.ssyrk(1.0, rows.T, beta=0.0, c=buffers[channels], trans=0, lower=0, overwrite_c=1)


class HessianAccumulator:
    """Accumulates ``H = X^T X``, per-channel abs-max and sum of ``|x|``, and the token count.

    H is a float64 total of symmetric rank-k updates: float32 activations (ONNX Runtime's) are multiplied in
    float32, up to ``FLOAT32_ROWS`` rows at a time (what the GPTQ reference does for all of H), and those sums
    added in float64; float64 and integer activations are multiplied in float64.
    ``update`` takes activations of any leading shape ``[..., K]``; every leading index is a token.
    """

    def __init__(self, channels: int) -> None:
        if channels < 1:
            raise ValueError(f"channels must be positive, got {channels}")
        self.channels = channels
        # Updates add to the upper triangle only (a symmetric rank-k update does half a GEMM's work);
        # reading ``hessian`` mirrors it into the lower one, in place. Fortran order lets BLAS update in place.
        self._matrix = np.zeros((channels, channels), dtype=np.float64, order="F")
        self._mirrored = True
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
        if not np.isfinite(flat).all():
            raise ValueError("activations contain NaN or Inf")
        if len(flat) == 0:
            return
        # upper(H) += upper(X^T X): BLAS syrk on X^T (a Fortran-ordered view of X, no copy)
        matrix = self._kept_matrix()
        if flat.dtype.itemsize <= 4:
            tokens = flat.astype(np.float32, copy=False)
            for start in range(0, len(tokens), FLOAT32_ROWS):
                rows = tokens[start : start + FLOAT32_ROWS]
                np.add(matrix, _float32_product(rows), out=matrix)
        else:
            tokens = flat.astype(np.float64)
            self._matrix = blas.dsyrk(1.0, tokens.T, beta=1.0, c=matrix, trans=0, lower=0, overwrite_c=1)
        del tokens
        self._mirrored = False
        # The magnitudes in the activations' own type (float32 from ONNX Runtime): |x| and the maximum are exact in
        # it, and the sum is accumulated in float64 as before, so the statistics are the same at a fraction of the
        # float64 passes' cost.
        magnitudes = np.abs(flat)
        np.maximum(self.abs_max, magnitudes.max(axis=0), out=self.abs_max)
        self.abs_sum += magnitudes.sum(axis=0, dtype=np.float64)
        self.tokens += len(flat)

    @property
    def hessian(self) -> np.ndarray:
        """``H = X^T X`` [K, K] float64, symmetric (the lower triangle is refreshed from the upper one after updates)."""
        self._kept_matrix()
        if not self._mirrored:
            np.copyto(self._matrix, self._matrix.T, where=np.tri(self.channels, k=-1, dtype=bool))
            self._mirrored = True
        return self._matrix

    @hessian.setter
    def hessian(self, value: np.ndarray) -> None:
        value = np.array(value, dtype=np.float64, order="F")  # a copy, in the layout BLAS updates in place
        if value.shape != (self.channels, self.channels):
            raise ValueError(f"hessian must be [{self.channels}, {self.channels}], got shape {value.shape}")
        self._matrix = value
        self._mirrored = False  # the upper triangle is what counts, as after an update

    def release(self) -> None:
        """Drop H (the ``[K, K]`` matrix) once nothing will read it again; the magnitudes and token count stay."""
        self._matrix = None

    def _kept_matrix(self) -> np.ndarray:
        if self._matrix is None:
            raise RuntimeError("H was released (HessianAccumulator.release): it cannot be read or updated")
        return self._matrix

    @property
    def mean_abs(self) -> np.ndarray:
        """Per-channel mean ``|x|`` over all tokens seen (zeros before any token)."""
        return self.abs_sum / max(self.tokens, 1)
