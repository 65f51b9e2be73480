"""GPTQ group quantization of a ``[K, N]`` weight: NumPy (SciPy's LAPACK for the factorisation), no graph code.

GPTQ (Frantar et al., IST-DASLab/gptq) quantizes the input channels one at a time and spreads each
channel's rounding error over the input channels not yet quantized, weighted by the inverse of the
calibration Hessian ``H = X^T X``; this minimises the layer's *output* error ``trace(dW^T H dW)``
rather than the weight error. The usual notation has ``W[N, K]`` and quantizes columns; our weight is
``B = W^T [K, N]``, so here a "column" of GPTQ is a *row* of ``B`` (one input channel, N weights) and
the updates are written transposed: ``B[k+1:] -= outer(U[k, k+1:], err_k)``.

Implementation follows the reference: upper Cholesky factor ``U`` of ``(H + damp)^-1``, blocks of
``update_width`` rows updated eagerly inside the block and lazily (one matmul) for the rows after it, and
optional act-order (rows processed by decreasing ``diag(H)``). Codes, scales and zero points use
rtn.py's ``group_params`` / ``quantize_with_params`` conventions, and the error that is propagated is
computed from exactly the float32 values ``QuantizedWeight.dequantize()`` returns.

Choices:

* **Dead inputs** (``H[k, k] == 0``: the channel was always zero in calibration). As in GPTQ, ``H[k, k]``
  is set to 1 so the factorisation exists; this decouples channel k, so no error flows into or out of
  it. Unlike GPTQ the weight row is *not* zeroed: it is quantized from its original values (RTN
  semantics within its group's parameters), so the model stays right if that channel is nonzero at
  inference.
* **Per-OC groups** (``"oc"``, g consecutive input channels = rows of ``B``). Without act-order a
  group's parameters come from the *current* (error-updated) rows of the group when its first row is
  reached (GPTQ's default; rows of the group past the current block get their pending lazy update
  first, so block and group sizes need not align). With act-order the rows of a group are visited out
  of order, so the parameters of every original group are computed once from the original weight
  before any update (GPTQ's ``static_groups``); they are stored per original group, so blocked
  ``DequantizeLinear(axis=0)`` reconstructs ``dequantize()`` exactly.
* **Per-IC groups** (``"ic"``, groups along the N outputs of one input channel): all groups of a row
  lie in that row, so its parameters come from its current values when it is quantized, in any order.
* **Clip search** (``scheme.clip_search``): wherever group parameters are made, their range is searched
  (``rtn.search_group_params``), per-OC groups weighting each input channel's error by ``H[k, k]`` (its
  cost at the output; the original ``diag(H)``, before dead-channel and damping changes); a per-IC group
  lies in one input channel, so its weighting is uniform. The GPTQ reference has the same search as its
  ``mse`` option, on the unweighted error.
"""

from __future__ import annotations

import dataclasses
import typing

import numpy as np
from scipy.linalg import lapack

from lowbit.passes.quant.rtn import QuantizedWeight, check_weight, scheme_group_params
from lowbit.passes.quant.scheme import QuantScheme


class HessianNotPositiveDefinite(ValueError):
    """The damped Hessian has no Cholesky factor: more dampening (``damp``) may give one."""


@dataclasses.dataclass(frozen=True)
class HessianFactor:
    """What GPTQ needs of one Hessian at one dampening: computed once (``factor_hessian``) and shared by every
    weight and group layout quantized on that Hessian (AdaDim's candidates, weights that read one input)."""

    #: Rows in processing order (by decreasing ``H[k, k]`` with act-order).
    order: np.ndarray
    #: Upper triangular float32 ``U`` with ``U^T U`` the inverse of the damped Hessian, rows in ``order``.
    inv_chol: np.ndarray
    #: The original ``diag(H)`` (before dead-channel and damping changes): weights the clip search.
    channel_weights: np.ndarray
    act_order: bool


def factor_hessian(hessian: np.ndarray, *, damp: float = 0.01, act_order: bool = True) -> HessianFactor:
    """Order and inverse Cholesky factor of ``hessian + damp * mean(diag(H)) * I`` (dead channels' ``H[k, k]``
    set to 1 first); ``HessianNotPositiveDefinite`` where it has none (more dampening may give one).

    One ``[K, K]`` float64 working copy beside ``hessian`` (the largest temporaries of a layer's quantization):
    ordered and reversed in the copy that fancy indexing makes, factored and inverted in place."""
    hessian = np.asarray(hessian)
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian must be a square [K, K] matrix, got shape {hessian.shape}")
    if not np.isfinite(hessian).all():
        raise ValueError("hessian contains NaN or Inf; refusing to quantize")
    if damp < 0:
        raise ValueError(f"damp must be non-negative, got {damp}")
    channel_weights = np.diag(hessian).astype(np.float64)  # what an error on each input channel costs (clip search)
    diagonal = channel_weights.copy()
    diagonal[diagonal == 0] = 1.0  # dead channels
    order = np.argsort(-diagonal, kind="stable") if act_order else np.arange(len(diagonal))
    damping = damp * np.mean(diagonal[order])
    reverse = order[::-1]
    reversed_hessian = hessian[np.ix_(reverse, reverse)].astype(np.float64, copy=False)  # J P H P^T J
    reversed_hessian[np.diag_indices(len(reverse))] = diagonal[reverse] + damping
    return HessianFactor(order, _inverse_cholesky_of_reversed(reversed_hessian), channel_weights, act_order)


def quantize_gptq(
    weight: np.ndarray,
    hessian: np.ndarray,
    scheme: QuantScheme,
    *,
    damp: float = 0.01,
    update_width: int = 128,
    act_order: bool = True,
) -> QuantizedWeight:
    """GPTQ-quantize a ``[K, N]`` weight given the ``[K, K]`` calibration Hessian ``X^T X``.

    ``damp`` is added to the diagonal as a fraction of ``mean(diag(H))``; ``update_width`` is the number
    of rows updated eagerly between lazy batch updates (GPTQ's ``blocksize``; not the group length, which
    is the scheme's) (it changes speed, not the result beyond float
    round-off); ``act_order`` visits input channels by decreasing ``H[k, k]``.
    """
    weight = check_weight(weight)
    if np.shape(hessian) != (weight.shape[0], weight.shape[0]):
        raise ValueError(f"hessian must be [{weight.shape[0]}, {weight.shape[0]}] for a weight of shape {weight.shape}")
    if update_width < 1:
        raise ValueError(f"update_width must be positive, got {update_width}")
    return quantize_factored(weight, factor_hessian(hessian, damp=damp, act_order=act_order), scheme, update_width)


def quantize_factored(
    weight: np.ndarray, factor: HessianFactor, scheme: QuantScheme, update_width: int = 128
) -> QuantizedWeight:
    """``quantize_gptq`` with the Hessian's factor given (``factor_hessian``), so that the weights and
    layouts that share a Hessian share its factorisation."""
    weight = check_weight(weight)
    num_cols = weight.shape[1]
    group = scheme.block_size(weight.shape)
    axis = scheme.block_axis
    order, channel_weights = factor.order, factor.channel_weights
    static_groups = axis == 0 and factor.act_order
    max_code = (1 << scheme.bits) - 1

    if static_groups:
        scales, zero_points = scheme_group_params(weight, scheme, group, 0, channel_weights)
        offsets = zero_points.astype(np.float32)
    else:
        param_shape = list(weight.shape)
        param_shape[axis] = -(-param_shape[axis] // group)
        scales = np.empty(param_shape, dtype=np.float32)
        zero_points = np.empty(param_shape, dtype=np.uint8)
        offsets = np.empty(param_shape, dtype=np.float32)
    codes = np.empty(weight.shape, dtype=np.uint8)

    def round_row(row: int, values: np.ndarray, pending) -> np.ndarray:
        original = order[row]
        if axis == 1:
            params = scheme_group_params(values[None], scheme, group, 1)
            scales[original], zero_points[original] = params
            offsets[original] = params[1]
            row_scales = np.repeat(scales[original], group)[:num_cols]
            row_offsets = np.repeat(offsets[original], group)[:num_cols]
        else:
            if not static_groups and row % group == 0:
                index, group_rows = row // group, pending(row, row + group)
                scales[index], zero_points[index] = scheme_group_params(
                    group_rows, scheme, len(group_rows), 0, channel_weights[order[row : row + group]]
                )
                offsets[index] = zero_points[index]
            index = original // group if static_groups else row // group
            row_scales, row_offsets = scales[index], offsets[index]
        codes[original], rounded = _round_row(values, row_scales, row_offsets, max_code)
        return rounded

    sweep(weight, factor, round_row, update_width)
    return QuantizedWeight(codes, scales, zero_points, scheme.bits, group, axis, scheme.symmetric)


def sweep(weight: np.ndarray, factor: HessianFactor, round_row, update_width: int = 128) -> None:
    """GPTQ's error propagation over the rows of ``weight`` in ``factor.order``, for any grid.

    ``round_row(row, values, pending)`` rounds the ``row``-th row in processing order (``values``: float32, with
    every update so far) onto the grid and returns its float32 reconstruction, keeping the codes itself;
    ``pending(first, last)`` gives rows ``first:last`` (processing order) with every update so far, for grids
    whose parameters are made from rows not yet reached (GPTQ's groups without act-order).

    Updates are blocked on two levels: a row's error goes at once to the rest of its ``EAGER_ROWS`` rows, a
    finished run of those rows to the rest of the ``update_width`` block in one product, and a finished block to
    every row after it in one product; blocking changes the float round-off, not the algorithm.
    """
    num_rows, num_cols = weight.shape
    if factor.inv_chol.shape != (num_rows, num_rows):
        raise ValueError(f"the Hessian factor is for {len(factor.inv_chol)} rows, the weight has shape {weight.shape}")
    if update_width < 1:
        raise ValueError(f"update_width must be positive, got {update_width}")
    inv_chol = factor.inv_chol
    current = np.asarray(weight, dtype=np.float32)[factor.order]  # a copy, updated in place as errors propagate
    for start in range(0, num_rows, update_width):
        stop = min(start + update_width, num_rows)
        errors = np.empty((stop - start, num_cols), dtype=np.float32)
        for run in range(start, stop, EAGER_ROWS):
            run_stop = min(run + EAGER_ROWS, stop)
            blocks = _Blocks(start, run, run_stop, stop)
            for row in range(run, run_stop):
                local = row - start

                def pending(first: int, last: int, blocks=blocks, errors=errors[:local]) -> np.ndarray:
                    return _current_rows(current, inv_chol, errors, blocks, first, last)

                values = current[row]
                rounded = round_row(row, values, pending)
                errors[local] = (values - rounded) / inv_chol[row, row]
                current[row + 1 : run_stop] -= inv_chol[row, row + 1 : run_stop, None] * errors[local]
            current[run_stop:stop] -= inv_chol[run:run_stop, run_stop:stop].T @ errors[run - start : run_stop - start]
        current[stop:] -= inv_chol[start:stop, stop:].T @ errors


#: Rows whose errors ``sweep`` propagates one by one (each row's to the rest of its run); longer runs spend more
#: time in NumPy's elementwise updates, shorter ones in more, smaller products.
EAGER_ROWS = 16


class _Blocks(typing.NamedTuple):
    """Where a row of ``sweep`` lies: its ``update_width`` block ``start:stop`` and its eager run ``run:run_stop``."""

    start: int
    run: int
    run_stop: int
    stop: int


def _inverse_cholesky_of_reversed(reversed_hessian: np.ndarray) -> np.ndarray:
    """Upper triangular ``U`` with ``U^T U = H^-1``, computed in float64 in place of ``reversed_hessian``
    (``J H J``, ``J`` the index reversal; C-contiguous, symmetric), returned as float32.

    ``J H J = L L^T`` gives ``H = R R^T`` for the upper triangular ``R = J L J``, so ``U = R^-1``: one Cholesky
    and one triangular inversion, cheaper than GPTQ's Cholesky, inverse, Cholesky.
    """
    # The transpose of a symmetric C-contiguous matrix is itself in Fortran order: LAPACK works on it in place.
    lower, info = lapack.dpotrf(reversed_hessian.T, lower=True, clean=True, overwrite_a=True)
    if info != 0:
        raise HessianNotPositiveDefinite("the damped Hessian is not positive definite; increase damp")
    _reverse_in_place(lower)  # R = J L J
    inverse, info = lapack.dtrtri(lower, lower=False, overwrite_c=True)
    if info != 0:
        raise HessianNotPositiveDefinite("the Hessian's Cholesky factor is singular; increase damp")
    return inverse.astype(np.float32)


def _reverse_in_place(matrix: np.ndarray, block_rows: int = 64) -> None:
    """``matrix[::-1, ::-1]`` written into ``matrix`` itself, a block of rows at a time (no full-size copy)."""
    rows = len(matrix)
    top = 0
    while rows - 2 * top >= 2 * block_rows:
        bottom = rows - top - block_rows
        kept = matrix[top : top + block_rows].copy()
        matrix[top : top + block_rows] = matrix[bottom : bottom + block_rows][::-1, ::-1]
        matrix[bottom : bottom + block_rows] = kept[::-1, ::-1]
        top += block_rows
    matrix[top : rows - top] = matrix[top : rows - top][::-1, ::-1].copy()


def _current_rows(
    current: np.ndarray, inv_chol: np.ndarray, errors: np.ndarray, blocks: _Blocks, first: int, last: int
) -> np.ndarray:
    """Rows ``first:last`` (``first`` in the current run) with every update so far, including those ``sweep``
    has not applied yet: rows of the run are up to date; rows after it in the block miss the errors of the run's
    rows already quantized, rows after the block those of the block's (``errors``: the block's rows so far)."""
    start, run, run_stop, stop = blocks
    parts = [current[first : min(last, run_stop)]]
    done = start + len(errors)  # rows of the block quantized so far
    if last > run_stop and stop > run_stop:
        rows = slice(run_stop, min(last, stop))
        parts.append(current[rows] - inv_chol[run:done, rows].T @ errors[run - start :])
    if last > stop:
        parts.append(current[stop:last] - inv_chol[start:done, stop:last].T @ errors)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _round_row(
    values: np.ndarray, scales: np.ndarray, offsets: np.ndarray, max_code: int
) -> tuple[np.ndarray, np.ndarray]:
    """Codes (uint8) and float32 reconstruction of one row under its per-element scales and zero points (as
    float32): ``rtn.quantize_with_params`` and ``QuantizedWeight.dequantize`` in float32, bit for bit (codes and
    zero points are small integers, exact in float32)."""
    rounded = np.round(values / scales)
    rounded += offsets
    np.clip(rounded, 0, max_code, out=rounded)
    return rounded.astype(np.uint8), (rounded - offsets) * scales
