"""Summary statistics of one tensor for the details panel: min, max, mean, std and a histogram.

Computed in chunks so a large embedding table never needs a float64 copy of itself; non-finite
values are counted and left out of the other figures.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

HISTOGRAM_BINS = 32
_CHUNK = 1 << 22
_HISTOGRAM_SAMPLE = 1 << 20


def tensor_stats(tensor: ir.TensorProtocol, bins: int = HISTOGRAM_BINS) -> dict | None:
    """``{min, max, mean, std, nonfinite, hist}`` of a numeric tensor, None for strings or empty tensors.

    Min, max, mean and std are exact; the histogram counts at most ``_HISTOGRAM_SAMPLE`` evenly
    strided elements (a picture of the distribution, cheap on a 30M-element embedding table), with
    one bin per value for integers of a small range and for constants.
    """
    if tensor.dtype == ir.DataType.STRING:
        return None
    flat = np.asarray(tensor.numpy()).reshape(-1)
    if flat.size == 0:
        return None
    low, high, total, squares, count = np.inf, -np.inf, 0.0, 0.0, 0
    for start in range(0, flat.size, _CHUNK):
        values = _finite(flat[start : start + _CHUNK])
        if values.size:
            low, high = min(low, float(values.min())), max(high, float(values.max()))
            total += float(values.sum())
            squares += float(np.dot(values, values))
            count += values.size
    if count == 0:
        return {"min": None, "max": None, "mean": None, "std": None, "nonfinite": int(flat.size), "hist": []}
    mean = total / count
    sample = _finite(flat[:: -(-flat.size // _HISTOGRAM_SAMPLE)])
    if tensor.dtype.is_integer() and high - low < bins:
        bins, width = int(high - low) + 1, 1.0  # one bin per value: the codes of a 4-bit weight get 16
    else:
        width = (high - low) / bins or 1.0  # equal-width bins over [min, max]; a constant gets one bin
        bins = bins if high > low else 1
    index = np.minimum(((sample - low) / width).astype(np.int64), bins - 1)
    return {
        "min": _short(low),
        "max": _short(high),
        "mean": _short(mean),
        "std": _short(float(np.sqrt(max(squares / count - mean * mean, 0.0)))),
        "nonfinite": int(flat.size - count),
        "hist": np.bincount(index, minlength=bins).tolist(),
    }


def _finite(chunk: np.ndarray) -> np.ndarray:
    """The chunk as float64 (int4, bool and bfloat16 included), without NaN and Inf."""
    values = chunk.astype(np.float64)
    if chunk.dtype.kind in "iub":
        return values
    finite = np.isfinite(values)
    return values if finite.all() else values[finite]


def _short(number: float) -> float:
    """Six significant digits: enough to read, and a smaller page."""
    return float(f"{number:.6g}")
