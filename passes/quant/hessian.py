"""Streaming calibration statistics of one weight's input: ``H = X^T X`` and per-channel magnitudes.

Memory is O(K^2) whatever the number of tokens: each batch is folded into running sums and dropped.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import blas


class HessianAccumulator:
    """Accumulates ``H = X^T X`` (float64, by symmetric rank-k updates), per-channel abs-max and sum of ``|x|``, and the token count.

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
        # upper(H) += upper(X^T X): BLAS dsyrk on X^T (a Fortran-ordered view of X, no copy), in place
        matrix = self._kept_matrix()
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
