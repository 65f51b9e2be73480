"""Random orthogonal rotations (QuaRot, QuIP#): spread a vector's energy over all its channels.

Multiplying the residual stream by an orthogonal ``Q`` (and the weights by ``Q^T``) leaves a float model's
function unchanged but turns a few large channels into many moderate ones, so weights reading the stream
have no outlier rows left for a low-bit grid to waste its levels on.
"""

from __future__ import annotations

import numpy as np


def random_orthogonal(size: int, seed: int) -> np.ndarray:
    """A Haar-distributed ``[size, size]`` orthogonal matrix in float64, the same for the same seed.

    QR of a Gaussian matrix, with R's diagonal signs moved into Q (without that step Q is not uniformly
    distributed over the orthogonal group)."""
    if size < 1:
        raise ValueError(f"a rotation needs at least one channel, got {size}")
    gaussian = np.random.default_rng(seed).standard_normal((size, size))
    q, r = np.linalg.qr(gaussian)
    signs = np.sign(np.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs
