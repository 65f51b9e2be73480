"""AdaDim axis selection: pick per layer the group layout (per-OC or per-IC) with the lower output error.

For ``y = x B`` with ``B[K, N]`` and calibration inputs stacked in ``X``, replacing ``B`` by ``B_hat``
changes the outputs by ``X dB``; summed over tokens its squared norm is
``||X dB||_F^2 = trace(dB^T H dB)`` with ``H = X^T X`` (the Hessian GPTQ also uses). This is the
paper's ``matrix`` selector; block-level and downstream selectors need the graph and live there.
"""

from __future__ import annotations

import numpy as np


def output_error(weight: np.ndarray, approx: np.ndarray, hessian: np.ndarray) -> float:
    """``trace(dW^T H dW)`` with ``dW = weight - approx`` (both ``[K, N]``), in float64."""
    diff = np.asarray(weight, dtype=np.float64) - np.asarray(approx, dtype=np.float64)
    return float(np.sum((np.asarray(hessian, dtype=np.float64) @ diff) * diff))


def relative_output_error(weight: np.ndarray, approx: np.ndarray, hessian: np.ndarray) -> float:
    """``output_error`` divided by the output energy ``trace(W^T H W)`` (raw error when that is 0)."""
    return relative(output_error(weight, approx, hessian), output_error(weight, np.zeros_like(weight), hessian))


def relative(error: float, energy: float) -> float:
    """An output error relative to the output energy ``trace(W^T H W)`` (the raw error when that is 0)."""
    return error / energy if energy > 0 else error


def lowest(errors: dict[str, float]) -> str:
    """The candidate with the lowest output error (the ``matrix`` choice). Ties go to the earliest key, so list
    ``"oc"`` first to prefer the layout ORT fuses natively."""
    if not errors:
        raise ValueError("choosing an axis needs at least one candidate")
    return min(errors, key=errors.__getitem__)
