"""Round-to-nearest (RTN) group quantization of a ``[K, N]`` weight, pure NumPy, no graph code.

Groups are runs of ``g`` consecutive elements along one axis of ``B[K, N]`` (axis 0: per-OC groups,
axis 1: per-IC groups); when the axis length is not a multiple of ``g`` the last group is shorter,
exactly like ONNX blocked ``DequantizeLinear``.

Codes are kept in the unsigned domain ``0 .. 2**bits - 1`` with an integer zero point per group:

* asymmetric: the range ``[min(w, 0), max(w, 0)]`` is cut into ``2**bits - 1`` steps; the zero point
  is ``round(-min / scale)``;
* symmetric: ``scale = 2 * max|w| / (2**bits - 1)`` and the zero point is fixed at ``2**(bits - 1)``, so
  the signed code ``q - 2**(bits-1)`` uses all ``2**bits`` levels (GPTQ's convention).

Both keep every element within ``scale / 2`` of its reconstruction. Dequantization follows ONNX
Runtime's float32 arithmetic, ``(q - zp) * scale``, so ``dequantize()`` equals what the graph computes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lowbit.ir.scheme import QuantScheme


@dataclasses.dataclass
class QuantizedWeight:
    """Codes, scales and zero points of one group-quantized ``[K, N]`` weight."""

    codes: np.ndarray  # uint8 [K, N], unsigned domain 0 .. 2**bits - 1
    scales: np.ndarray  # float32, the [K, N] shape with the block axis cut to ceil(len / g)
    zero_points: np.ndarray  # uint8, same shape as scales, unsigned domain
    bits: int
    block_size: int
    block_axis: int
    symmetric: bool

    def expand(self, per_group: np.ndarray) -> np.ndarray:
        """Broadcast a per-group array back to the full ``[K, N]`` shape."""
        return expand_groups(per_group, self.block_size, self.block_axis, self.codes.shape)

    def dequantize(self) -> np.ndarray:
        """The float32 weight that ONNX Runtime's ``DequantizeLinear`` reconstructs."""
        centered = self.codes.astype(np.int32) - self.expand(self.zero_points).astype(np.int32)
        return centered.astype(np.float32) * self.expand(self.scales)

    def signed_codes(self) -> np.ndarray:
        """Symmetric codes in the signed domain ``-2**(bits-1) .. 2**(bits-1) - 1`` (zero point 0)."""
        if not self.symmetric:
            raise ValueError("signed codes exist only for symmetric quantization")
        return (self.codes.astype(np.int16) - (1 << (self.bits - 1))).astype(np.int8)


def group_starts(length: int, block_size: int) -> np.ndarray:
    return np.arange(0, length, block_size)


def expand_groups(per_group: np.ndarray, block_size: int, axis: int, shape: tuple[int, ...]) -> np.ndarray:
    """Repeat each group's value ``block_size`` times along ``axis`` and crop to ``shape``."""
    full = np.repeat(per_group, block_size, axis=axis)
    return full[tuple(slice(0, n) for n in shape)]


def group_params(
    weight: np.ndarray, bits: int, block_size: int, axis: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (uint8) of every group of ``weight`` along ``axis``."""
    max_code = (1 << bits) - 1
    starts = group_starts(weight.shape[axis], block_size)
    group_max = np.maximum.reduceat(weight, starts, axis=axis).astype(np.float32)
    group_min = np.minimum.reduceat(weight, starts, axis=axis).astype(np.float32)
    if symmetric:
        abs_max = np.maximum(np.abs(group_max), np.abs(group_min))
        scales = (2.0 * abs_max / max_code).astype(np.float32)
        scales[scales == 0] = 1.0  # an all-zero group: any scale reconstructs it exactly
        zero_points = np.full(scales.shape, 1 << (bits - 1), dtype=np.uint8)
        return scales, zero_points
    group_max = np.maximum(group_max, 0.0)
    group_min = np.minimum(group_min, 0.0)
    scales = ((group_max - group_min) / max_code).astype(np.float32)
    scales[scales == 0] = 1.0
    zero_points = np.clip(np.round(-group_min / scales), 0, max_code).astype(np.uint8)
    return scales, zero_points


def quantize_with_params(
    weight: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bits: int, block_size: int, axis: int
) -> np.ndarray:
    """Round ``weight`` onto the grid of the given group parameters; returns uint8 codes."""
    full_scales = expand_groups(scales, block_size, axis, weight.shape)
    full_zero = expand_groups(zero_points, block_size, axis, weight.shape).astype(np.float32)
    codes = np.round(weight.astype(np.float32) / full_scales) + full_zero
    return np.clip(codes, 0, (1 << bits) - 1).astype(np.uint8)


#: Largest |w| a quantizer accepts: a group's range ``max - min`` and the grid's end points (up to
#: ``2**bits - 1`` steps from the zero point) stay within float32 up to half its range.
MAX_MAGNITUDE = float(np.finfo(np.float32).max) / 2


def check_weight(weight: np.ndarray) -> np.ndarray:
    """The weight as float32 after the checks every quantizer needs: 2-D, not empty, finite, not huge."""
    weight = np.asarray(weight, dtype=np.float32)
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D [K, N] weight, got shape {weight.shape}")
    if weight.size == 0:
        raise ValueError(f"cannot quantize an empty weight (shape {weight.shape})")
    if not np.isfinite(weight).all():
        raise ValueError("weight contains NaN or Inf; refusing to quantize it")
    largest = float(np.abs(weight).max())
    if largest > MAX_MAGNITUDE:
        raise ValueError(f"weight has |w| up to {largest:.3g}, beyond half the float32 range where its quantization grid overflows")
    return weight


def quantize_rtn(weight: np.ndarray, scheme: QuantScheme) -> QuantizedWeight:
    """RTN-quantize a finite 2-D ``[K, N]`` weight with ``scheme``'s bits, groups and symmetry."""
    weight = check_weight(weight)
    block_size = scheme.block_size(weight.shape)
    axis = scheme.block_axis
    scales, zero_points = group_params(weight, scheme.bits, block_size, axis, scheme.symmetric)
    codes = quantize_with_params(weight, scales, zero_points, scheme.bits, block_size, axis)
    return QuantizedWeight(codes, scales, zero_points, scheme.bits, block_size, axis, scheme.symmetric)


def relative_error(weight: np.ndarray, approx: np.ndarray) -> float:
    """``||W - W_hat||_F / ||W||_F`` (0 for an all-zero weight reproduced exactly)."""
    weight = np.asarray(weight, dtype=np.float64)
    diff = np.linalg.norm(weight - np.asarray(approx, dtype=np.float64))
    norm = np.linalg.norm(weight)
    return float(diff / norm) if norm > 0 else float(diff)
