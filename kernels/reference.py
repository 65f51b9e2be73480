"""NumPy oracle of the lowbit custom ops.

``lowbit::QuantMatMul`` (domain ``lowbit``, since version 1): ``Y = A[..., perm] @ W + bias (+ A[..., perm] @ S)``
with a group-quantized weight ``W[K, N]`` (the ONNX ``MatMul`` right operand; torch ``Linear.weight`` is
``W.T``) and optional exact float32 outliers ``S[K, N]`` stored sparse (dense-and-sparse quantization).

Attributes (all int; required unless a default is given):

* ``bits`` in {2, 3, 4, 5, 6, 8}; ``K >= 1`` input channels; ``N >= 1`` output channels;
* ``group_axis``: 0 = per-OC groups (``g`` consecutive input channels of one output channel share a
  scale; ``DequantizeLinear(axis=0, block_size=g)``), 1 = per-IC groups (``g`` consecutive output
  channels of one input channel; ``axis=1``);
* ``group_size`` ``g >= 1``; the last group along the axis may be shorter (``g`` larger than the
  axis means one group).
* ``int8_activations`` in {0, 1}, default 0: 1 quantizes the activations to int8 at run time (below), like
  ``MatMulNBits``' ``accuracy_level=4``: faster integer dot products, less accurate.

Inputs (``G = ceil(K / g)`` for axis 0, ``ceil(N / g)`` for axis 1):

0. ``A``: float32 ``[..., K]``, rank >= 1.
1. ``packed``: uint8 ``[ceil(N / 64), ceil(K / 4), 32 * bits]``, the codes ``q[K, N]`` in the layout of
   :mod:`lowbit.kernels.packing`.
2. ``scales``: float32 or float16 ``[G, N]`` (axis 0) or ``[K, G]`` (axis 1), the layout of ONNX blocked
   quantization and of ``QuantizedWeight.scales``; float16 scales are read as the float32 of their value
   (half the bytes, the same arithmetic).
3. ``zero_points`` (optional): uint8, same shape as ``scales``, unsigned domain like the codes.
   Absent: every zero point is the mid-point ``2**(bits - 1)`` (symmetric quantization).
4. ``perm`` (optional): int64 ``[K]``, indices in ``[0, K)``; row ``k`` of ``W`` multiplies
   ``A[..., perm[k]]``. Absent: identity.
5. ``bias`` (optional): float32 ``[N]``.
6. ``outlier_pointers`` (optional): uint32 ``[N + 1]``, the CSC column pointers of ``S``: column ``n``'s
   entries are ``[outlier_pointers[n], outlier_pointers[n + 1])``; starts at 0, never decreases, ends at nnz.
7. ``outlier_rows`` (optional): uint16 ``[nnz]``, the row (in ``W``'s, i.e. permuted, order) of each entry.
8. ``outlier_values`` (optional): float32 ``[nnz]``. Inputs 6-8 go together. ``S`` may repeat a position
   (entries add up) and may hold a position where ``W`` is non-zero (they add up too).

Output: ``Y``, float32 ``[..., N]``.

Semantics: ``W[k, n] = float32(q[k, n] - z) * s`` with ``(s, z)`` the scale and zero point of the
group holding ``(k, n)`` -- exactly ONNX ``DequantizeLinear`` -- and ``Y`` the IEEE product of
``A[..., perm]`` and ``W`` plus ``bias``, plus the product of ``A[..., perm]`` and ``S`` (summed apart): NaN and
Inf in ``A`` propagate as in a dense float matmul (``Inf * 0 = NaN``; ``S``'s absent entries are not
multiplied). Kernels may sum in any order; this oracle sums in float64 and rounds once per part.

With ``int8_activations=1`` the quantized part ``A[..., perm] @ W`` becomes integer dot products with int8
activations (the outliers, the bias and ``perm`` stay as above). The input channels (``W``'s order) are cut
into *activation blocks* of at most ``ACTIVATION_BLOCK`` = 128: per-OC, each weight group is cut from its
start (a block never straddles a group, so a block's sum takes one weight scale per column); per-IC, the
whole ``K`` from 0. 128 keeps a block's integer sum exact in a float32 (``128 * 255 * 127 < 2**24``) and
puts one float conversion and scaling after 32 quads of integer products. Per row and block, the factor of
the sum that varies along ``K`` is quantized: ``xs = x`` (per-OC) or ``xs = float32(x * s[k, j])`` (per-IC:
the scale of input channel ``k`` in output group ``j``; so once per group of output channels), symmetric::

    amax = max |xs| over the block          a = float32(amax / 127)
    X[k] = rint(float32(xs[k] * float32(1 / a)))  (half to even; |X| <= 127)

If ``amax`` is not finite (a NaN or Inf among ``xs``), ``a`` is NaN and the block makes the row's outputs
of every column it multiplies NaN; if ``a`` is 0 or ``1 / a`` overflows (``amax`` below ``127 * 2**-128``)
the block's ``X`` are 0. Then, with ``z`` the zero points::

    per-OC: Y[m, n] = sum over blocks b (in group j)  a[m, b] * s[j, n] * sum_{k in b} X[m, k] (q[k, n] - z[j, n])
    per-IC: Y[m, n] = sum over blocks b  a_j[m, b] * sum_{k in b} X_j[m, k] (q[k, n] - z[k, j]),  j = n // g

The integer sums are exact; kernels multiply them by the float factors in any order.

``lowbit::QuantGather`` (domain ``lowbit``, since version 1): ``Y = T[ids]`` with ``T = W^T`` the rows of an
embedding table read as *columns* of a ``QuantMatMul`` weight ``W[K, N]`` (``K`` = the embedding width,
``N`` = the vocabulary), from the same ``packed``, ``scales`` and ``zero_points``: a tied embedding and LM
head store the table once. CPU only.

Attributes: ``bits``, ``group_axis``, ``group_size``, ``K``, ``N``, as for ``QuantMatMul`` (the ones that
describe ``W``).

Inputs:

0. ``packed``: uint8 ``[ceil(N / 64), ceil(K / 4), 32 * bits]``, as ``QuantMatMul``'s input 1.
1. ``ids``: int64, any shape (rank 0 too), values in ``[-N, N)``; a negative id counts from the end
   (``n = id + N``), as ONNX ``Gather``. Any other value is an error that names the op, the id and ``N``.
2. ``scales``: float32 or float16, as ``QuantMatMul``'s input 2.
3. ``zero_points`` (optional): uint8, as ``QuantMatMul``'s input 3 (absent: ``2**(bits - 1)``).

Output: ``Y``, float32 ``[*ids.shape, K]``, ``Y[..., k] = float32(q[k, n] - z) * s`` with ``n = ids[...]``
and ``(s, z)`` the parameters of the group holding ``(k, n)``: exactly column ``n`` of ``dequantize``'s
``W`` (one float32 product per element, so kernels agree bitwise).
"""

from __future__ import annotations

import numpy as np

from lowbit.kernels import packing

#: Input channels per int8 activation block (``int8_activations=1``; see the module docstring).
ACTIVATION_BLOCK = 128
#: The int8 activation codes lie in [-INT8_LIMIT, INT8_LIMIT].
INT8_LIMIT = 127


def group_count(length: int, group_size: int) -> int:
    return -(-length // group_size)


def params_shape(group_axis: int, group_size: int, k: int, n: int) -> tuple[int, int]:
    """Shape of ``scales`` and ``zero_points`` for the given grouping."""
    if group_axis == 0:
        return (group_count(k, group_size), n)
    if group_axis == 1:
        return (k, group_count(n, group_size))
    raise ValueError(f"group_axis must be 0 or 1, got {group_axis!r}")


def dequantize(
    codes: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    *,
    bits: int,
    group_size: int,
    group_axis: int,
) -> np.ndarray:
    """``W[K, N] = float32(q - z) * s`` per group, as ONNX ``DequantizeLinear``."""
    k, n = codes.shape
    shape = params_shape(group_axis, group_size, k, n)
    if scales.shape != shape:
        raise ValueError(f"scales must have shape {shape}, got {scales.shape}")
    if zero_points is None:
        zero_points = np.full(shape, 1 << (bits - 1), dtype=np.uint8)
    elif zero_points.shape != shape:
        raise ValueError(f"zero_points must have shape {shape}, got {zero_points.shape}")
    full_scales = np.repeat(scales.astype(np.float32), group_size, axis=group_axis)[:k, :n]
    full_zero = np.repeat(zero_points.astype(np.int32), group_size, axis=group_axis)[:k, :n]
    return (codes.astype(np.int32) - full_zero).astype(np.float32) * full_scales


def quant_matmul(
    a: np.ndarray,
    packed: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None = None,
    perm: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    outlier_pointers: np.ndarray | None = None,
    outlier_rows: np.ndarray | None = None,
    outlier_values: np.ndarray | None = None,
    *,
    bits: int,
    group_size: int,
    group_axis: int,
    K: int,
    N: int,
    int8_activations: int = 0,
) -> np.ndarray:
    """``lowbit::QuantMatMul`` (see the module docstring)."""
    a = np.asarray(a, dtype=np.float32)
    if a.ndim < 1 or a.shape[-1] != K:
        raise ValueError(f"A must have shape [..., {K}], got {a.shape}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if int8_activations not in (0, 1):
        raise ValueError(f"int8_activations must be 0 or 1, got {int8_activations!r}")
    codes = packing.unpack(packed, bits, K, N)
    weight = dequantize(codes, scales, zero_points, bits=bits, group_size=group_size, group_axis=group_axis)
    if perm is not None:
        perm = np.asarray(perm)
        if perm.shape != (K,) or perm.min() < 0 or perm.max() >= K:
            raise ValueError(f"perm must be int64 [{K}] with values in [0, {K})")
        a = a[..., perm]
    with np.errstate(invalid="ignore", over="ignore"):
        if int8_activations:
            y = int8_product(a, codes, scales, zero_points, bits=bits, group_size=group_size, group_axis=group_axis)
        else:
            y = a.astype(np.float64) @ weight.astype(np.float64)
        if bias is not None:
            y = y + np.asarray(bias, dtype=np.float64).reshape(N)
        y = y.astype(np.float32)
        if outlier_pointers is not None:
            y = y + outlier_product(a, outlier_pointers, outlier_rows, outlier_values, K=K, N=N)
        return y


def quant_gather(
    packed: np.ndarray,
    ids: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None = None,
    *,
    bits: int,
    group_size: int,
    group_axis: int,
    K: int,
    N: int,
) -> np.ndarray:
    """``lowbit::QuantGather`` (see the module docstring): columns ``ids`` of the packed ``W[K, N]``,
    dequantized, float32 ``[*ids.shape, K]``."""
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise ValueError(f"QuantGather: ids must be integers, got {ids.dtype}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    ids = ids.astype(np.int64)
    bad = (ids < -N) | (ids >= N)
    if np.any(bad):
        raise IndexError(f"QuantGather: id {ids[bad].flat[0]} is out of range for N = {N} (ids must be in [{-N}, {N}))")
    codes = packing.unpack(packed, bits, K, N)
    weight = dequantize(codes, scales, zero_points, bits=bits, group_size=group_size, group_axis=group_axis)
    return np.ascontiguousarray(weight.T[np.where(ids < 0, ids + N, ids)])


def outlier_product(
    a: np.ndarray, pointers: np.ndarray, rows: np.ndarray, values: np.ndarray, *, K: int, N: int
) -> np.ndarray:
    """``a @ S`` for the CSC outliers of ``quant_matmul`` (float64 sums of the products, rounded once)."""
    pointers, rows = np.asarray(pointers, np.int64), np.asarray(rows, np.int64)
    values = np.asarray(values, np.float32)
    nnz = rows.size
    if pointers.shape != (N + 1,) or pointers[0] != 0 or pointers[-1] != nnz or np.any(np.diff(pointers) < 0):
        raise ValueError(f"outlier_pointers must be [{N + 1}], from 0 to nnz = {nnz}, never decreasing")
    if values.shape != (nnz,) or (nnz and (rows.min() < 0 or rows.max() >= K)):
        raise ValueError(f"outlier_rows and outlier_values must be [nnz] with rows in [0, {K})")
    columns = np.repeat(np.arange(N), np.diff(pointers))
    out = np.zeros((*a.shape[:-1], N), np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        np.add.at(np.moveaxis(out, -1, 0), columns, np.moveaxis(a[..., rows].astype(np.float64) * values, -1, 0))
    return out.astype(np.float32)


def activation_blocks(k: int, group_size: int, group_axis: int) -> list[tuple[int, int]]:
    """The int8 activation blocks ``[k0, k1)`` over ``K`` input channels (module docstring)."""
    if group_axis == 0:
        spans = [(g0, min(k, g0 + group_size)) for g0 in range(0, k, group_size)]
    else:
        spans = [(0, k)]
    return [(k0, min(end, k0 + ACTIVATION_BLOCK)) for start, end in spans for k0 in range(start, end, ACTIVATION_BLOCK)]


def quantize_activations(xs: np.ndarray, blocks: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes ``X[..., K]`` (int32) and block scales ``a[..., blocks]`` (float32, NaN for a block
    with a non-finite value) of float32 activations ``xs``, exactly as the module docstring rounds them."""
    xs = np.asarray(xs, dtype=np.float32)
    codes = np.zeros(xs.shape, np.int32)
    scales = np.empty((*xs.shape[:-1], len(blocks)), np.float32)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        for i, (k0, k1) in enumerate(blocks):
            part = xs[..., k0:k1]
            amax = np.max(np.abs(part), axis=-1)  # NaN if any is NaN
            scale = amax / np.float32(INT8_LIMIT)
            inverse = np.float32(1) / scale
            usable = np.isfinite(amax) & (scale > 0) & np.isfinite(inverse)
            rounded = np.rint(part * np.where(usable, inverse, np.float32(0))[..., None])
            codes[..., k0:k1] = np.where(usable[..., None], rounded, 0).astype(np.int32)
            scales[..., i] = np.where(np.isfinite(amax), scale, np.float32(np.nan))
    return codes, scales


def int8_product(
    a: np.ndarray,
    codes: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    *,
    bits: int,
    group_size: int,
    group_axis: int,
    magnitude: bool = False,
) -> np.ndarray:
    """``A @ W`` with int8 activations (``int8_activations=1``), float64 ``[..., N]``; ``a`` is already permuted.

    ``magnitude``: the sum of the terms' absolute values instead (the scale of the kernels' float round-off).
    """
    k, n = codes.shape
    if zero_points is None:
        zero_points = np.full(params_shape(group_axis, group_size, k, n), 1 << (bits - 1), np.uint8)
    blocks = activation_blocks(k, group_size, group_axis)
    signed = np.abs if magnitude else (lambda x: x)
    out = np.zeros((*a.shape[:-1], n), np.float64)
    if group_axis == 0:
        shifted = codes.astype(np.int64) - np.repeat(zero_points.astype(np.int64), group_size, axis=0)[:k]
        x, x_scales = quantize_activations(a, blocks)
        for i, (k0, k1) in enumerate(blocks):
            part = signed(x[..., k0:k1].astype(np.float64)) @ signed(shifted[k0:k1].astype(np.float64))
            column_scales = signed(scales[k0 // group_size].astype(np.float64))
            out += signed(x_scales[..., i, None].astype(np.float64)) * column_scales * part
        return out
    for j in range(group_count(n, group_size)):
        columns = slice(j * group_size, min(n, (j + 1) * group_size))
        x, x_scales = quantize_activations(a * scales[:, j].astype(np.float32), blocks)
        shifted = codes[:, columns].astype(np.int64) - zero_points[:, j : j + 1].astype(np.int64)
        for i, (k0, k1) in enumerate(blocks):
            part = signed(x[..., k0:k1].astype(np.float64)) @ signed(shifted[k0:k1].astype(np.float64))
            out[..., columns] += signed(x_scales[..., i, None].astype(np.float64)) * part
    return out
