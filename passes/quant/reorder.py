"""Channel reordering math: which permutation brings large-activation channels together, where it moves
a consumer's input positions, and the calibration statistics after it. No graph code.

Terms. A *source* (a weight MatMul, or several sharing one channel space, like gate/up) writes ``C``
channels. A *target* weight reads ``K`` input positions; position ``k`` holds source channel
``channel[k]`` as computed inside *slice* ``slice[k]``: positions whose values come from different
per-slice functions (the heads of an attention, where each head has its own probabilities) are in
different slices; an elementwise path has one slice. A permutation ``p`` of the source channels (new
channel ``j`` = old channel ``p[j]``) can be folded into the source's output channels when every channel
stays inside the slices that read it; the target's input positions then move by ``q`` (new position
``k`` = old position ``q[k]``), so its weight rows and its input statistics are permuted by ``q``.

Ordering ("Accurate Block Quantization in LLMs with Outliers"): within each class of interchangeable
channels, sort by the activation's per-channel abs-max (``absmax``) or by ``diag(H)`` (``hessian``),
largest first, so per-OC groups of consecutive input channels hold channels of similar magnitude.
"""

from __future__ import annotations

import numpy as np

from lowbit.passes.quant.hessian import HessianAccumulator
from lowbit.passes.quant.scheme import REORDER_CRITERIA

CRITERIA = REORDER_CRITERIA


def position_scores(statistics: HessianAccumulator, criterion: str) -> np.ndarray:
    """Per input position of the target: the activation's abs-max, or the Hessian diagonal ``sum x_k^2``."""
    if criterion == "absmax":
        return statistics.abs_max.copy()
    if criterion == "hessian":
        return statistics.diagonal.copy()
    raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")


def source_scores(scores: np.ndarray, channel: np.ndarray, channels: int) -> np.ndarray:
    """Per source channel: the largest score among the target positions that read it (-inf if none)."""
    result = np.full(channels, -np.inf)
    np.maximum.at(result, channel, scores)
    return result


def positions_are_distinct(channel: np.ndarray, slice_: np.ndarray) -> bool:
    """True when no slice reads one channel at two positions (then ``q`` is well defined)."""
    pairs = np.stack([np.asarray(slice_), np.asarray(channel)], axis=1)
    return len(np.unique(pairs, axis=0)) == len(pairs)


def interchangeable_classes(channel: np.ndarray, slice_: np.ndarray, channels: int) -> np.ndarray:
    """A class label per source channel: channels read by exactly the same set of slices may trade places."""
    pairs = np.unique(np.stack([np.asarray(channel), np.asarray(slice_)], axis=1), axis=0)  # sorted by channel
    signatures: dict[int, tuple[int, ...]] = {c: () for c in range(channels)}
    starts = np.flatnonzero(np.r_[True, pairs[1:, 0] != pairs[:-1, 0]])
    for start, stop in zip(starts, np.r_[starts[1:], len(pairs)]):
        signatures[int(pairs[start, 0])] = tuple(pairs[start:stop, 1].tolist())
    labels: dict[tuple[int, ...], int] = {}
    return np.array([labels.setdefault(signatures[c], len(labels)) for c in range(channels)], dtype=np.int64)


def sorting_permutation(scores: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """``p`` that orders each class's channels by descending score over the positions the class holds.

    Ties keep the original order (stable), so equal scores give the identity.
    """
    scores, classes = np.asarray(scores), np.asarray(classes)
    if scores.shape != classes.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and classes {classes.shape} must be the same 1-D shape")
    permutation = np.arange(len(scores))
    for label in np.unique(classes):
        members = np.flatnonzero(classes == label)
        permutation[members] = members[np.argsort(-scores[members], kind="stable")]
    return permutation


def position_permutation(channel: np.ndarray, slice_: np.ndarray, permutation: np.ndarray) -> np.ndarray:
    """``q`` with ``channel[q[k]] == permutation[channel[k]]`` and ``slice[q[k]] == slice[k]`` for every k.

    Raises ValueError when a slice reads a channel twice or ``permutation`` moves a channel out of a
    slice that reads it (then the permutation cannot be folded).
    """
    channel, slice_, permutation = np.asarray(channel), np.asarray(slice_), np.asarray(permutation)
    if not positions_are_distinct(channel, slice_):
        raise ValueError("a slice reads the same channel at two positions")
    width = len(permutation)
    keys = slice_.astype(np.int64) * width + channel
    order = np.argsort(keys)
    wanted = slice_.astype(np.int64) * width + permutation[channel]
    found = np.searchsorted(keys[order], wanted).clip(max=len(keys) - 1)
    if not np.array_equal(keys[order][found], wanted):
        raise ValueError("the permutation moves a channel out of a slice that reads it")
    return order[found]


def permute_statistics(statistics: HessianAccumulator, q: np.ndarray) -> HessianAccumulator:
    """The statistics of ``x[..., q]`` from those of ``x``: ``H[q][:, q]`` (or ``diag(H)[q]`` where only the
    diagonal was collected), ``abs_max[q]``, ``abs_sum[q]``."""
    q = np.asarray(q)
    if sorted(q.tolist()) != list(range(statistics.channels)):
        raise ValueError(f"q must be a permutation of range({statistics.channels})")
    result = HessianAccumulator(statistics.channels, diagonal_only=statistics.diagonal_only)
    if statistics.diagonal_only:
        result.diagonal[:] = statistics.diagonal[q]  # the accumulator's own square sums
    else:
        result.hessian = statistics.hessian[np.ix_(q, q)]
    result.abs_max = statistics.abs_max[q]
    result.abs_sum = statistics.abs_sum[q]
    result.tokens = statistics.tokens
    return result
