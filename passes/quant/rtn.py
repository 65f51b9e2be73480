"""Round-to-nearest (RTN) group quantization of a ``[K, N]`` weight, pure NumPy, no graph code.

Groups are runs of ``g`` consecutive elements along one axis of ``B[K, N]`` (axis 0: per-OC groups,
axis 1: per-IC groups); when the axis length is not a multiple of ``g`` the last group is shorter,
exactly like ONNX blocked ``DequantizeLinear``.

Codes are kept in the unsigned domain ``0 .. 2**bits - 1`` with an integer zero point per group:

* asymmetric: the range ``[min(w, 0), max(w, 0)]`` is cut into ``2**bits - 1`` steps; the zero point
  is ``round(-min / scale)``;
* symmetric: ``scale = 2 * max|w| / (2**bits - 1)`` and the zero point is fixed at ``2**(bits - 1)``, so
  the signed code ``q - 2**(bits-1)`` uses all ``2**bits`` levels (GPTQ's convention).

Both keep every element within ``scale / 2`` of its reconstruction. With ``clip_search`` the range is
shrunk per group where that lowers the group's (weighted) squared error (``search_group_params``): the
elements past the clipped range then err by more than ``scale / 2``, all the others by less. Dequantization follows ONNX
Runtime's float32 arithmetic, ``(q - zp) * scale``, so ``dequantize()`` equals what the graph computes.
"""

from __future__ import annotations

import dataclasses
import typing

import numpy as np

from lowbit.passes.quant.scheme import SCALE_DTYPES, QuantScheme


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
    weight: np.ndarray, bits: int, block_size: int, axis: int, symmetric: bool, scale_dtype: str = "float32"
) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32, rounded to ``scale_dtype``'s values) and zero point (uint8) of every group of
    ``weight`` along ``axis``."""
    starts = group_starts(weight.shape[axis], block_size)
    group_max = np.maximum.reduceat(weight, starts, axis=axis).astype(np.float32)
    group_min = np.minimum.reduceat(weight, starts, axis=axis).astype(np.float32)
    return range_params(group_min, group_max, bits, symmetric, scale_dtype)


def range_params(
    group_min: np.ndarray, group_max: np.ndarray, bits: int, symmetric: bool, scale_dtype: str = "float32"
) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32, rounded to ``scale_dtype``'s values) and zero point (uint8) of groups whose values
    span ``[group_min, group_max]``; the zero point is chosen for the rounded scale."""
    max_code = (1 << bits) - 1
    if symmetric:
        abs_max = np.maximum(np.abs(group_max), np.abs(group_min))
        scales = round_scales((2.0 * abs_max / max_code).astype(np.float32), scale_dtype)
        scales[scales == 0] = 1.0  # an all-zero group: any scale reconstructs it exactly
        zero_points = np.full(scales.shape, 1 << (bits - 1), dtype=np.uint8)
        return scales, zero_points
    group_max = np.maximum(group_max, 0.0)
    group_min = np.minimum(group_min, 0.0)
    scales = round_scales(((group_max - group_min) / max_code).astype(np.float32), scale_dtype)
    scales[scales == 0] = 1.0
    zero_points = np.clip(np.round(-group_min / scales), 0, max_code).astype(np.uint8)
    return scales, zero_points


#: float16's normal range: a scale outside it would lose precision (subnormal) or overflow in float16.
_FLOAT16_NORMAL = (float(np.finfo(np.float16).smallest_normal), float(np.finfo(np.float16).max))


def round_scales(scales: np.ndarray, scale_dtype: str) -> np.ndarray:
    """float32 ``scales`` as ``scale_dtype`` keeps them: for float16, each scale within float16's normal range
    becomes its nearest float16 value (a relative change below 2**-11); a scale outside that range stays as
    it is, so its weight is written with float32 scales (``kernels.model.storage_scales``)."""
    if scale_dtype == "float32":
        return scales
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype!r}")
    low, high = _FLOAT16_NORMAL
    in_range = (scales >= low) & (scales <= high)
    with np.errstate(over="ignore"):
        rounded = scales.astype(np.float16).astype(np.float32)
    return np.where(in_range & np.isfinite(rounded), rounded, scales).astype(np.float32)


#: Clipping ratios ``search_group_params`` tries: the min-max range times 1.0, 0.975, ..., 0.5 (AWQ's grid).
CLIP_RATIOS = np.linspace(1.0, 0.5, 21)

#: Up to this many elements (ratios x weight entries) ``search_group_params`` evaluates every ratio in one
#: vectorised step (fewest NumPy calls: a single row in GPTQ's sweep); above it, one ratio at a time over
#: blocks of the weight that stay in cache while every ratio is tried on them.
_SEARCH_ALL_AT_ONCE_ELEMENTS = 1 << 19

#: Weight entries in one cache block of ``search_group_params``'s blocked evaluation.
_SEARCH_BLOCK_ELEMENTS = 1 << 16


def search_group_params(
    weight: np.ndarray,
    bits: int,
    block_size: int,
    axis: int,
    symmetric: bool,
    channel_weights: np.ndarray | None = None,
    ratios: np.ndarray = CLIP_RATIOS,
    scale_dtype: str = "float32",
) -> tuple[np.ndarray, np.ndarray]:
    """Like ``group_params``, but each group's range is its min-max range times the ratio of ``ratios``
    with the lowest squared rounding error over the group, each row ``k`` weighted by
    ``channel_weights[k]`` (``diag(H)``: what an error on input channel k costs at the output; default
    uniform). Clipping a few extreme weights buys a finer step for all the others, which at 2-4 bits
    usually lowers the error. Ratios are tried in order and ties keep the earlier one; with 1.0 first
    (the default grid) the error is never above that of ``group_params``.

    Ratios are positive, so a shrunk group's min and max are the ratio times the group's own (exactly, in
    float32: rounding is monotonic); only the rounding error is evaluated per ratio, on the weight laid
    out as ``[..., group, member, ...]`` (a short last group padded with its edge value, weighted zero).
    Small inputs evaluate all ratios at once, large ones one ratio at a time on cache-sized blocks
    (``_blocked_rounding_error``); both give the same errors bit for bit.
    """
    weight = np.asarray(weight, dtype=np.float32)
    num_rows = weight.shape[0]
    row_weights = None
    if channel_weights is not None:
        row_weights = np.asarray(channel_weights, dtype=np.float64)
        if row_weights.shape != (num_rows,):
            raise ValueError(f"channel_weights must have one entry per row ({num_rows}), got shape {row_weights.shape}")
    error, scales, zero_points = _candidate_errors(
        weight, bits, block_size, axis, symmetric, row_weights, ratios, scale_dtype
    )
    # per group the first ratio with the lowest error (earlier ratios win ties), taken from the flat candidates
    best = np.argmin(error, axis=0).ravel()
    picked = best * best.size + np.arange(best.size)
    return scales.ravel()[picked].reshape(error.shape[1:]), zero_points.ravel()[picked].reshape(error.shape[1:])


def _candidate_errors(
    weight: np.ndarray,
    bits: int,
    block_size: int,
    axis: int,
    symmetric: bool,
    row_weights: np.ndarray | None,
    ratios: np.ndarray,
    scale_dtype: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per ratio (leading axis) and group: the weighted squared rounding error (float64), the scale and the
    zero point of ``search_group_params``' candidates; the parameters keep the members axis (length 1)."""
    ratios = np.asarray(ratios, dtype=np.float32)
    grouped, element_weights = _grouped_layout(weight, block_size, axis, row_weights)
    members = axis + 1  # the axis of a group's members in the grouped layout
    group_min = grouped.min(axis=members, keepdims=True)
    group_max = grouped.max(axis=members, keepdims=True)
    shrink = ratios.reshape(-1, 1, 1, 1)  # one candidate range per ratio
    scales, zero_points = range_params(shrink * group_min, shrink * group_max, bits, symmetric, scale_dtype)
    grids = Grids(scales, zero_points.astype(np.float32), (1 << bits) - 1)
    if _compiled_rounding_errors is not None:
        error = _compiled_rounding_errors(grouped, grids, element_weights, axis)
    elif len(ratios) * grouped.size <= _SEARCH_ALL_AT_ONCE_ELEMENTS:
        error = _rounding_error(grouped, grids, element_weights, members + 1)
    else:
        error = _blocked_rounding_error(grouped, grids, element_weights, members)
    return error, scales, zero_points


#: The candidates' errors from compiled loops, bit for bit ``_rounding_error``'s (``lowbit.kernels.clip_search``
#: installs them where the op library is built), or None: NumPy.
_compiled_rounding_errors = None


def use_compiled_rounding_errors(function) -> None:
    """Evaluate the clip search's candidates with ``function(grouped, grids, element_weights, axis)`` (the errors
    ``_rounding_error`` gives for the layout ``_grouped_layout`` makes along ``axis``, the same bits), or with NumPy
    again for None."""
    global _compiled_rounding_errors
    _compiled_rounding_errors = function


def _grouped_layout(
    weight: np.ndarray, block_size: int, axis: int, row_weights: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """``weight`` as ``[G, g, N]`` (axis 0) or ``[K, G, g]`` (axis 1), a short last group padded with its
    edge value, and the float64 weight of each element's squared error, broadcastable to that layout: its
    row's weight, zero for padding; ``None`` where every weight would be 1 (multiplying by 1 changes nothing)."""
    length = weight.shape[axis]
    num_groups = -(-length // block_size)
    padding = num_groups * block_size - length
    if padding:
        weight = np.take(weight, np.minimum(np.arange(length + padding), length - 1), axis=axis)
    grouped_shape = list(weight.shape)
    grouped_shape[axis : axis + 1] = [num_groups, block_size]
    grouped = weight.reshape(grouped_shape)
    if row_weights is None and not padding:
        return grouped, None
    if axis == 0:  # rows are grouped: a padded row gets weight zero
        if row_weights is None:
            row_weights = np.ones(length)
        return grouped, np.concatenate([row_weights, np.zeros(padding)]).reshape(num_groups, block_size, 1)
    real_members = (np.arange(num_groups * block_size) < length).reshape(1, num_groups, block_size)
    if row_weights is None:
        return grouped, real_members.astype(np.float64)
    return grouped, row_weights.reshape(-1, 1, 1) * real_members


class Grids(typing.NamedTuple):
    """Candidate integer grids: scales and zero points (as float32) broadcast against the grouped weight,
    codes ``0 .. max_code``."""

    scales: np.ndarray
    offsets: np.ndarray
    max_code: int


def _rounding_error(grouped: np.ndarray, grids: Grids, element_weights: np.ndarray | None, members: int) -> np.ndarray:
    """Weighted squared error of rounding ``grouped`` onto ``grids``, summed over the axis ``members``: float32
    rounding and reconstruction as in ``quantize_with_params`` and ``QuantizedWeight.dequantize``, the squares
    in float64."""
    approx = np.divide(grouped, grids.scales)
    np.round(approx, out=approx)
    approx += grids.offsets
    np.clip(approx, 0, grids.max_code, out=approx)
    approx -= grids.offsets
    approx *= grids.scales
    np.subtract(grouped, approx, out=approx)
    squared = np.square(approx, dtype=np.float64)
    if element_weights is not None:
        squared *= element_weights
    return squared.sum(axis=members)


def _blocked_rounding_error(
    grouped: np.ndarray, grids: Grids, element_weights: np.ndarray | None, members: int
) -> np.ndarray:
    """``_rounding_error`` of every candidate (leading axis of the grids' scales and offsets), one candidate at a
    time on contiguous blocks of ``grouped`` along its free axis (columns of ``[G, g, N]``, rows of
    ``[K, G, g]``), so that a block stays in cache while every candidate is tried on it.

    A block holds at least two slices of the free axis: the sum over ``[G, g, N]``'s strided members axis
    then runs in order over the members exactly as on the whole array (over a single slice NumPy would sum
    them pairwise, which rounds differently)."""
    free = 2 if members == 1 else 0  # the free axis in the grouped layout
    free_length = grouped.shape[free]
    num_blocks = max(1, min(-(-grouped.size // _SEARCH_BLOCK_ELEMENTS), free_length // 2))
    edges = (np.arange(num_blocks + 1) * free_length // num_blocks).tolist()
    error_shape = list(grouped.shape)
    del error_shape[members]
    error = np.empty([len(grids.scales), *error_shape])
    error_free = free // 2  # the free axis in the error's layout

    def along(array: np.ndarray, axis: int, first: int, last: int) -> np.ndarray:
        if array.shape[axis] == 1:  # broadcast along the free axis
            return array
        return array[(slice(None),) * axis + (slice(first, last),)]

    for first, last in zip(edges[:-1], edges[1:]):
        block = np.ascontiguousarray(along(grouped, free, first, last))
        block_weights = None if element_weights is None else along(element_weights, free, first, last)
        for candidate in range(len(grids.scales)):
            block_grids = Grids(
                along(grids.scales[candidate], free, first, last),
                along(grids.offsets[candidate], free, first, last),
                grids.max_code,
            )
            block_error = _rounding_error(block, block_grids, block_weights, members)
            along(error[candidate], error_free, first, last)[...] = block_error
    return error


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
        raise ValueError(
            f"weight has |w| up to {largest:.3g}, beyond half the float32 range where its quantization grid overflows"
        )
    return weight


def fit_to_type(quantized: QuantizedWeight, float_type) -> QuantizedWeight:
    """``quantized`` as a ``DequantizeLinear`` writing ``float_type`` (float32, float16) reconstructs it.

    The scales become the values that type stores (a positive scale below its smallest subnormal becomes
    that subnormal rather than 0); a code whose reconstruction ``(q - zp) * scale`` leaves the type's
    finite range (float16 weights near +-65504: a symmetric grid reaches ``2**(bits-1)`` steps below zero,
    a rounded zero point half a step past the range) moves one step towards the zero point, so that the
    dequantized weight stays finite and within one step of the float one. ``dequantize()`` of the result
    is what the graph computes (before the product's own rounding to ``float_type``).
    """
    float_type = np.dtype(float_type)
    info = np.finfo(float_type)
    stored = quantized.scales.astype(float_type)
    if not np.isfinite(stored).all():
        raise ValueError(f"a group's scale exceeds the {float_type} range ({info.max:.6g})")
    scales = stored.astype(np.float32)
    scales = np.where((scales == 0) & (quantized.scales > 0), np.float32(info.smallest_subnormal), scales).astype(
        np.float32
    )
    codes = quantized.codes
    full_scales = quantized.expand(scales)
    zero = quantized.expand(quantized.zero_points).astype(np.int32)
    for _ in range(4):  # one step inwards suffices for a weight inside the range; a few for safety
        centered = codes.astype(np.int32) - zero
        with np.errstate(over="ignore"):
            outside = ~np.isfinite((centered.astype(np.float32) * full_scales).astype(float_type))
        if not outside.any():
            break
        codes = np.where(outside, codes.astype(np.int32) - np.sign(centered), codes).astype(np.uint8)
    else:
        raise ValueError(f"the quantized weight does not fit the {float_type} range ({info.max:.6g})")
    if codes is quantized.codes and np.array_equal(scales, quantized.scales):
        return quantized
    return dataclasses.replace(quantized, codes=codes, scales=scales)


def scheme_group_params(
    weight: np.ndarray, scheme: QuantScheme, block_size: int, axis: int, channel_weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Group parameters of ``weight`` as ``scheme`` asks: searched clipping range or plain min-max."""
    if scheme.clip_search:
        return search_group_params(
            weight, scheme.bits, block_size, axis, scheme.symmetric, channel_weights, scale_dtype=scheme.scale_dtype
        )
    return group_params(weight, scheme.bits, block_size, axis, scheme.symmetric, scheme.scale_dtype)


def quantize_rtn(weight: np.ndarray, scheme: QuantScheme, channel_weights: np.ndarray | None = None) -> QuantizedWeight:
    """RTN-quantize a finite 2-D ``[K, N]`` weight with ``scheme``'s bits, groups, symmetry and clipping;
    ``channel_weights`` (e.g. ``diag(H)``) weight the rows in the clipping search."""
    weight = check_weight(weight)
    block_size = scheme.block_size(weight.shape)
    axis = scheme.block_axis
    scales, zero_points = scheme_group_params(weight, scheme, block_size, axis, channel_weights)
    codes = quantize_with_params(weight, scales, zero_points, scheme.bits, block_size, axis)
    return QuantizedWeight(codes, scales, zero_points, scheme.bits, block_size, axis, scheme.symmetric)


def relative_error(weight: np.ndarray, approx: np.ndarray) -> float:
    """``||W - W_hat||_F / ||W||_F`` (0 for an all-zero weight reproduced exactly)."""
    weight = np.asarray(weight, dtype=np.float64)
    diff = np.linalg.norm(weight - np.asarray(approx, dtype=np.float64))
    norm = np.linalg.norm(weight)
    return float(diff / norm) if norm > 0 else float(diff)
