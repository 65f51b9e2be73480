"""Non-uniform codes: every group of a ``[K, N]`` weight gets its own table of ``2**bits`` values, fitted by
weighted 1-D k-means (SqueezeLLM's codebooks) or made of every signed sum of ``bits`` scales of its own
(``fit_bcq``: ShiftAddLLM's binary-coded groups), or the integer grid's groups share one fitted table of levels
(``fit_shared_table``); pure NumPy, no graph code.

Groups are laid out as in rtn.py: runs of ``block_size`` elements along ``axis`` of ``B[K, N]`` (axis 0:
per-OC groups, ``g`` input channels of one output channel; axis 1: per-IC groups, ``g`` output channels of one
input channel); ``block_size`` equal to the axis length gives one table per channel, the usual codebook setting,
since a table of ``2**bits`` floats costs as much as ``2**bits`` scales. An element's code indexes its group's
table, ``W[k, n] = table[group(k, n)][q[k, n]]``: no scale, no zero point, any spacing of the levels.

The fit minimises ``sum_k c[k] * sum_n (W[k, n] - W_hat[k, n])^2`` per group with channel weights ``c`` (``diag(H)``:
what an error on input channel k costs at the output, as in the clip search). Lloyd's iterations start from the
group's min-max uniform grid, so the error never exceeds that grid's; a group with at most ``2**bits`` distinct
values gets exactly those values, so weights already on a table come back exactly.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lowbit.passes.quant.gptq import HessianFactor, sweep
from lowbit.passes.quant.rtn import check_weight, expand_groups, scheme_group_params
from lowbit.passes.quant.scheme import QuantScheme

#: Lloyd's iterations at most; it stops earlier once no group's error moves by more than ``_TOLERANCE``.
MAX_ITERATIONS = 30
_TOLERANCE = 1e-7

#: Elements x table entries compared at once when codes are assigned (bounds the temporary arrays).
_ASSIGN_CHUNK = 1 << 23


@dataclasses.dataclass
class CodebookWeight:
    """Codes and per-group tables of one ``[K, N]`` weight."""

    codes: np.ndarray  # uint8 [K, N], indices into the group's table
    tables: np.ndarray  # float32 [groups along the axis, channels of the other axis, 2**bits] (axis 0: [G, N, T])
    bits: int
    block_size: int
    block_axis: int

    def group_index(self) -> np.ndarray:
        """int64 ``[K, N]``: the row of ``tables.reshape(-1, T)`` that holds each element's table."""
        k, n = self.codes.shape
        if self.block_axis == 0:
            return (np.arange(k) // self.block_size)[:, None] * n + np.arange(n)[None, :]
        groups = self.tables.shape[1]
        return np.arange(k)[:, None] * groups + (np.arange(n) // self.block_size)[None, :]

    def dequantize(self) -> np.ndarray:
        """The float32 weight: each code looked up in its group's table."""
        entries = 1 << self.bits
        return self.tables.reshape(-1)[self.group_index() * entries + self.codes]


def fit_codebook(
    weight: np.ndarray,
    bits: int,
    block_size: int,
    axis: int,
    channel_weights: np.ndarray | None = None,
    iterations: int = MAX_ITERATIONS,
) -> CodebookWeight:
    """Fit a ``2**bits``-entry table per group of ``weight`` (weighted k-means) and code every element."""
    weight, block_size, values, element_weights = _groups_to_fit(weight, bits, block_size, axis, channel_weights)
    tables = _kmeans(values, element_weights, 1 << bits, iterations).astype(np.float32)
    return _from_groups(_assign(values, tables), tables, weight.shape, bits, block_size, axis)


def fit_shared_table(
    weight: np.ndarray, scheme: QuantScheme, channel_weights: np.ndarray | None = None, iterations: int = MAX_ITERATIONS
) -> CodebookWeight:
    """One table of ``2**bits`` levels for the whole weight, in the integer grid's code units, under each
    group's own scale and zero point: ``W[k, n] = s_g * (table[q] - z_g)``. It stores what the integer grid
    stores (codes, scales, zero points) plus ``2**bits`` floats, and spaces the levels as the weight's
    values fall (denser near the zero point for bell-shaped groups, as NF4's fixed table does).

    The scales and zero points are ``scheme``'s (min-max, or the clip search); the table is fitted by
    weighted k-means from the integer grid ``0 .. 2**bits - 1`` with weights ``c[k] * s_g**2``, which is
    the squared error in the weight's units, so the error never exceeds the integer grid's with the same
    group parameters."""
    weight = check_weight(weight)
    if scheme.symmetric:
        raise ValueError("a shared table has its own zero points: use an asymmetric scheme")
    block_size, axis = scheme.block_size(weight.shape), scheme.block_axis
    scales, zero_points = scheme_group_params(weight, scheme, block_size, axis, channel_weights)
    full_scales = expand_groups(scales, block_size, axis, weight.shape).astype(np.float64)
    full_zero = expand_groups(zero_points, block_size, axis, weight.shape).astype(np.float64)
    rows = np.ones(weight.shape[0]) if channel_weights is None else np.asarray(channel_weights, np.float64)
    units = (weight / full_scales + full_zero).reshape(1, -1)  # every element in code units, one k-means row
    element_weights = (rows[:, None] * np.square(full_scales)).reshape(1, -1)
    table = _lloyd(units, element_weights, np.arange(1 << scheme.bits, dtype=np.float64)[None, :], iterations)[0]
    tables = scales[..., None].astype(np.float64) * (table - zero_points[..., None].astype(np.float64))
    # Nearest level in code units is the nearest in the weight's units (an affine map with a positive scale);
    # assigned row by row against the one table, without a table per element.
    codes = _assign(units.reshape(weight.shape), np.broadcast_to(table, (weight.shape[0], len(table))))
    return CodebookWeight(codes, tables.astype(np.float32), scheme.bits, block_size, axis)


def fit_bcq(
    weight: np.ndarray,
    bits: int,
    block_size: int,
    axis: int,
    channel_weights: np.ndarray | None = None,
    iterations: int = MAX_ITERATIONS,
    scale_dtype: type = np.float16,
) -> CodebookWeight:
    """Binary-coded quantization (BCQ, as ShiftAddLLM builds it): every group is ``sum_i alpha_i * b_i`` with
    ``bits`` scales ``alpha`` of its own and signs ``b_i = +-1`` per element, so the group's table is every signed
    sum of its scales (``2**bits`` levels, symmetric about 0) and an element's code picks one sign pattern.

    Fitted by alternating least squares (Xu et al.'s alternating multi-bit quantization): scales from the greedy
    residual signs, then in turn the scales that minimise the group's weighted squared error for the signs, and
    the nearest signed sum for every element; stored ``bits`` scales per group in ``scale_dtype`` (the fit
    rounds them to it). The table is kept sorted, as the other formats' are."""
    weight, block_size, values, element_weights = _groups_to_fit(weight, bits, block_size, axis, channel_weights)
    values = values.astype(np.float64)
    element_weights = element_weights + 1e-30  # a group whose rows all weigh 0 is fitted unweighted
    signs = np.array([[1.0 if (pattern >> i) & 1 else -1.0 for i in range(bits)] for pattern in range(1 << bits)])
    scales = np.empty((len(values), bits))
    residual = values.copy()
    for i in range(bits):  # greedy start: each scale the weighted mean |residual|, its sign the residual's
        scales[:, i] = np.sum(element_weights * np.abs(residual), axis=1) / np.sum(element_weights, axis=1)
        residual -= scales[:, i : i + 1] * np.where(residual >= 0, 1.0, -1.0)
    patterns = None
    for _ in range(iterations):
        scales = scales.astype(scale_dtype).astype(np.float64)
        levels = scales @ signs.T  # [P, 2**bits]: every signed sum
        order = np.argsort(levels, axis=1, kind="stable")
        tables = np.take_along_axis(levels, order, axis=1)
        codes = _assign(values, tables.astype(np.float32)).astype(np.int64)
        new_patterns = np.take_along_axis(order, codes, axis=1)  # [P, g]: the sign pattern of each element
        if patterns is not None and np.array_equal(new_patterns, patterns):
            break
        patterns = new_patterns
        bits_of = signs[patterns]  # [P, g, bits]
        weighted = bits_of * element_weights[..., None]
        gram = np.einsum("pgi,pgj->pij", weighted, bits_of)
        gram += np.eye(bits) * (1e-9 * np.trace(gram, axis1=1, axis2=2) / bits + 1e-30)[:, None, None]
        scales = np.linalg.solve(gram, np.einsum("pgi,pg->pi", weighted, values)[..., None])[..., 0]
    tables = np.sort(scales.astype(scale_dtype).astype(np.float64) @ signs.T, axis=1).astype(np.float32)
    return _from_groups(_assign(values, tables), tables, weight.shape, bits, block_size, axis)


def quantize_gptq_codebook(
    weight: np.ndarray, factor: HessianFactor, bits: int, block_size: int, axis: int, update_width: int = 128
) -> CodebookWeight:
    """Tables fitted on the original weight (``fit_codebook`` weighted by ``diag(H)``), then ``gptq_onto_tables``."""
    return gptq_onto_tables(
        weight, factor, fit_codebook(weight, bits, block_size, axis, factor.channel_weights), update_width
    )


def gptq_onto_tables(
    weight: np.ndarray, factor: HessianFactor, fitted: CodebookWeight, update_width: int = 128
) -> CodebookWeight:
    """GPTQ's error propagation (``gptq.sweep``) rounds each input channel, in the factor's order, to the
    nearest entries of ``fitted``'s tables: the tables stay fixed, like GPTQ's static groups, so the codes
    can move but the levels do not."""
    num_cols = fitted.codes.shape[1]
    codes = np.empty_like(fitted.codes)

    def row_tables(k: int) -> np.ndarray:
        """``[N, T]``: the table of each element of input channel ``k``."""
        if fitted.block_axis == 0:
            return fitted.tables[k // fitted.block_size]
        return np.repeat(fitted.tables[k], fitted.block_size, axis=0)[:num_cols]

    def round_row(row: int, values: np.ndarray, pending) -> np.ndarray:
        k = factor.order[row]
        tables = row_tables(k)
        codes[k] = _assign(values[:, None], tables)[:, 0]
        return np.take_along_axis(tables, codes[k][:, None].astype(np.int64), axis=1)[:, 0]

    sweep(check_weight(weight), factor, round_row, update_width)
    return dataclasses.replace(fitted, codes=codes)


def _groups_to_fit(
    weight: np.ndarray, bits: int, block_size: int, axis: int, channel_weights: np.ndarray | None
) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
    """The checked float32 weight, its group length (``block_size`` <= 0: the whole axis) and its groups' values and
    element weights (``_grouped``), for a table fit of ``bits``."""
    weight = check_weight(weight)
    if not 1 <= bits <= 8:
        raise ValueError(f"table bits must be in 1..8, got {bits}")
    if axis not in (0, 1):
        raise ValueError(f"axis must be 0 or 1, got {axis}")
    length = weight.shape[axis]
    block_size = min(block_size, length) if block_size > 0 else length
    row_weights = np.ones(weight.shape[0]) if channel_weights is None else np.asarray(channel_weights, np.float64)
    if row_weights.shape != (weight.shape[0],) or not np.all(row_weights >= 0):
        raise ValueError(f"channel_weights must be {weight.shape[0]} non-negative values, got {row_weights.shape}")
    return (weight, block_size, *_grouped(weight, row_weights, block_size, axis))


def _from_groups(
    codes: np.ndarray, tables: np.ndarray, shape: tuple[int, int], bits: int, block_size: int, axis: int
) -> CodebookWeight:
    """The ``CodebookWeight`` of codes ``[P, block_size]`` and float32 tables ``[P, 2**bits]`` laid out by groups."""
    groups = -(-shape[axis] // block_size)
    other = shape[1 - axis]
    table_shape = (groups, other) if axis == 0 else (other, groups)
    return CodebookWeight(
        codes=_ungrouped(codes, shape, block_size, axis).astype(np.uint8),
        tables=tables.reshape(*table_shape, 1 << bits),
        bits=bits,
        block_size=block_size,
        block_axis=axis,
    )


def _grouped(weight: np.ndarray, row_weights: np.ndarray, block_size: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """``[P, block_size]`` values of every group and their weights (a short last group padded with its
    edge value at weight zero); groups ordered like the table shape of ``fit_codebook``."""
    k, n = weight.shape
    length = weight.shape[axis]
    groups = -(-length // block_size)
    padding = groups * block_size - length
    pad = [(0, padding) if a == axis else (0, 0) for a in range(2)]
    padded = np.pad(weight, pad, mode="edge")
    real = np.pad(np.ones(weight.shape, bool), pad)
    element_weights = np.where(real, np.pad(np.broadcast_to(row_weights[:, None], (k, n)), pad), 0.0)
    if axis == 0:  # [G*g, N] -> [G, N, g]
        to_groups = lambda a: a.reshape(groups, block_size, n).transpose(0, 2, 1).reshape(-1, block_size)  # noqa: E731
    else:  # [K, G*g] -> [K, G, g]
        to_groups = lambda a: a.reshape(-1, block_size)  # noqa: E731
    return to_groups(padded), to_groups(element_weights)


def _ungrouped(grouped: np.ndarray, shape: tuple[int, int], block_size: int, axis: int) -> np.ndarray:
    k, n = shape
    if axis == 0:
        groups = grouped.shape[0] // n
        full = grouped.reshape(groups, n, block_size).transpose(0, 2, 1).reshape(groups * block_size, n)
    else:
        full = grouped.reshape(k, -1)
    return full[:k, :n]


def _assign(values: np.ndarray, tables: np.ndarray) -> np.ndarray:
    """Nearest-entry codes for sorted tables: the number of midpoints below each value."""
    midpoints = (tables[:, 1:] + tables[:, :-1]) / 2
    codes = np.empty(values.shape, dtype=np.uint8)
    rows = max(1, _ASSIGN_CHUNK // max(1, values.shape[1] * midpoints.shape[1]))
    for start in range(0, len(values), rows):
        block = values[start : start + rows, :, None] > midpoints[start : start + rows, None, :]
        codes[start : start + rows] = block.sum(axis=2)
    return codes


def _kmeans(values: np.ndarray, weights: np.ndarray, entries: int, iterations: int) -> np.ndarray:
    """Sorted ``[P, entries]`` tables: weighted Lloyd per row, from the row's min-max uniform grid; rows with
    at most ``entries`` distinct values get those values (padded with the largest)."""
    low, high = values.min(axis=1, keepdims=True), values.max(axis=1, keepdims=True)
    tables = (low + (high - low) * np.linspace(0.0, 1.0, entries)[None, :]).astype(np.float64)
    tables = _lloyd(values, weights, tables, iterations)
    exact = _distinct_tables(values, entries)
    return np.where(np.isnan(exact), tables, exact)


def _lloyd(values: np.ndarray, weights: np.ndarray, tables: np.ndarray, iterations: int) -> np.ndarray:
    """Weighted Lloyd iterations on every row of ``values [P, n]`` from sorted ``tables [P, entries]``: each
    step lowers (or keeps) the row's weighted squared error."""
    entries = tables.shape[1]
    rows = np.arange(len(values))[:, None] * entries
    previous = None
    for _ in range(iterations):
        codes = _assign(values, tables.astype(np.float32)).astype(np.int64)
        index = (rows + codes).ravel()
        mass = np.bincount(index, weights.ravel(), minlength=tables.size).reshape(tables.shape)
        total = np.bincount(index, (weights * values).ravel(), minlength=tables.size).reshape(tables.shape)
        tables = np.where(mass > 0, total / np.where(mass > 0, mass, 1.0), tables)
        tables.sort(axis=1)  # Lloyd keeps 1-D centroids ordered; a sort guards float ties
        error = np.sum(weights * np.square(values - np.take_along_axis(tables, codes, axis=1)), axis=1)
        if previous is not None and np.all(previous - error <= _TOLERANCE * np.maximum(previous, 1e-30)):
            break
        previous = error
    return tables


def _distinct_tables(values: np.ndarray, entries: int) -> np.ndarray:
    """Per row: its sorted distinct values padded with the largest, where there are at most ``entries``;
    NaN rows elsewhere."""
    ordered = np.sort(values, axis=1)
    new = np.concatenate([np.ones((len(values), 1), bool), np.diff(ordered, axis=1) > 0], axis=1)
    distinct = new.sum(axis=1)
    tables = np.full((len(values), entries), np.nan)
    for row in np.flatnonzero(distinct <= entries):
        found = ordered[row][new[row]]
        tables[row] = np.concatenate([found, np.full(entries - len(found), found[-1])])
    return tables
