"""Bit packing of quantization codes for ``lowbit::QuantMatMul`` (NumPy, vectorised).

The codes of a weight ``B[K, N]`` (uint8, unsigned domain ``0 .. 2**bits - 1``) are stored as a uint8
tensor of shape ``[ceil(N / 64), ceil(K / 4), 32 * bits]``. Output channels are cut into *tiles* of 64
and input channels into *quads* of 4 (the last tile and quad are padded with code 0). A kernel thread
streams one tile from start to end, keeping its 64 output accumulators in registers while it walks
down ``K``; the same layout serves per-OC and per-IC groups.

One (tile, quad) block holds 256 codes. Number them ``u[4c + j]`` = the code of column ``c`` (0..63) of
the tile and input channel ``4 * quad + j``: the 4 input channels of a column are adjacent, which is
what the int8 dot-product instructions (AVX-512 VNNI ``vpdpbusd``: 4 byte products summed per lane)
consume, and a 32-bit lane then holds the 4 codes of one column for the float kernels. The bits of
``u[0..255]`` are placed so that one load plus a shift and a mask yields 64 codes (VNNI) or 8/16
columns of one input channel (AVX2/AVX-512 float paths):

* 8-bit, 256 bytes: byte ``i`` is ``u[i]``.
* 4-bit, 128 bytes: byte ``i`` holds ``u[i]`` in its low nibble and ``u[i + 128]`` in its high nibble.
* 2-bit, 64 bytes: byte ``i`` holds ``u[i]``, ``u[i + 64]``, ``u[i + 128]``, ``u[i + 192]`` in bits 0-1,
  2-3, 4-5, 6-7.
* 3-bit, 96 bytes, dense: the low two bits of every code in the 2-bit layout (64 bytes), then bit 2 of
  ``u[i]`` as bit ``i`` of a little-endian 256-bit plane (32 bytes).
* 5-bit, 160 bytes: the low four bits in the 4-bit layout (128 bytes), then bit 4 of ``u[i]`` as bit ``i``
  of a 256-bit plane (32 bytes).
* 6-bit, 192 bytes: the low four bits in the 4-bit layout (128 bytes), then the high two bits in the
  2-bit layout (64 bytes).

So a weight costs exactly ``bits / 8`` bytes (plus the padding of the last tile and quad).
"""

from __future__ import annotations

import numpy as np

from lowbit.passes.quant.scheme import SUPPORTED_BITS

#: Output channels per tile, input channels per quad.
TILE = 64
QUAD = 4


def block_bytes(bits: int) -> int:
    """Bytes per (tile, quad) block: 256 codes of ``bits`` bits."""
    _check_bits(bits)
    return TILE * QUAD * bits // 8


def packed_shape(bits: int, k: int, n: int) -> tuple[int, int, int]:
    return (-(-n // TILE), -(-k // QUAD), block_bytes(bits))


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 codes ``[K, N]`` into the layout ``[ceil(N/64), ceil(K/4), 32*bits]``."""
    codes = np.asarray(codes)
    _check_bits(bits)
    if codes.ndim != 2 or codes.shape[0] < 1 or codes.shape[1] < 1:
        raise ValueError(f"expected non-empty [K, N] codes, got shape {codes.shape}")
    if codes.dtype != np.uint8 or int(codes.max()) >= 1 << bits:
        raise ValueError(f"codes must be uint8 in 0..{(1 << bits) - 1}")
    k, n = codes.shape
    tiles, quads, _ = packed_shape(bits, k, n)
    padded = np.zeros((quads * QUAD, tiles * TILE), dtype=np.uint8)
    padded[:k, :n] = codes
    # [quad, j, tile, c] -> [tile, quad, c, j] -> u[4c + j]
    u = padded.reshape(quads, QUAD, tiles, TILE).transpose(2, 0, 3, 1).reshape(tiles, quads, TILE * QUAD)
    if bits == 8:
        packed = u
    elif bits == 4:
        packed = _pack4(u)
    elif bits == 2:
        packed = _pack2(u)
    elif bits == 3:
        packed = np.concatenate([_pack2(u & 3), _pack_plane(u >> 2)], axis=-1)
    elif bits == 5:
        packed = np.concatenate([_pack4(u & 15), _pack_plane(u >> 4)], axis=-1)
    else:
        packed = np.concatenate([_pack4(u & 15), _pack2(u >> 4)], axis=-1)
    return np.ascontiguousarray(packed, dtype=np.uint8)


def unpack(packed: np.ndarray, bits: int, k: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack`: uint8 codes ``[K, N]``."""
    packed = np.asarray(packed)
    expected = packed_shape(bits, k, n)
    if packed.shape != expected or packed.dtype != np.uint8:
        raise ValueError(f"packed codes must be uint8 of shape {expected}, got {packed.dtype} {packed.shape}")
    tiles, quads, _ = expected
    if bits == 8:
        u = packed
    elif bits == 4:
        u = _unpack4(packed)
    elif bits == 2:
        u = _unpack2(packed)
    elif bits == 3:
        u = _unpack2(packed[..., :64]) | (_unpack_plane(packed[..., 64:]) << 2)
    elif bits == 5:
        u = _unpack4(packed[..., :128]) | (_unpack_plane(packed[..., 128:]) << 4)
    else:
        u = _unpack4(packed[..., :128]) | (_unpack2(packed[..., 128:]) << 4)
    codes = u.reshape(tiles, quads, TILE, QUAD).transpose(1, 3, 0, 2).reshape(quads * QUAD, tiles * TILE)
    return np.ascontiguousarray(codes[:k, :n])


def _pack4(u: np.ndarray) -> np.ndarray:
    """256 four-bit codes -> 128 bytes: byte i = u[i] | u[i+128] << 4."""
    return u[..., :128] | (u[..., 128:] << 4)


def _unpack4(packed: np.ndarray) -> np.ndarray:
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def _pack_plane(bit: np.ndarray) -> np.ndarray:
    """256 one-bit values -> 32 bytes: bit i of the little-endian plane is ``bit[i]``."""
    return np.packbits(bit & 1, axis=-1, bitorder="little")


def _unpack_plane(plane: np.ndarray) -> np.ndarray:
    return np.unpackbits(plane, axis=-1, bitorder="little")


def _pack2(u: np.ndarray) -> np.ndarray:
    """256 two-bit codes -> 64 bytes: byte i = u[i] | u[i+64] << 2 | u[i+128] << 4 | u[i+192] << 6."""
    return u[..., :64] | (u[..., 64:128] << 2) | (u[..., 128:192] << 4) | (u[..., 192:] << 6)


def _unpack2(packed: np.ndarray) -> np.ndarray:
    return np.concatenate([(packed >> shift) & 3 for shift in (0, 2, 4, 6)], axis=-1)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def pack_matmulnbits(codes: np.ndarray, block_size: int) -> np.ndarray:
    """4-bit codes ``[K, N]`` in ``com.microsoft::MatMulNBits``' layout ``B[N, ceil(K/block), block/2]``.

    Each output channel's K codes, padded with 0 to whole blocks, two per byte, the even input channel in
    the low nibble (ONNX Runtime's ``MatMulNBits`` operator spec).
    """
    codes = np.asarray(codes)
    if codes.dtype != np.uint8 or codes.ndim != 2 or int(codes.max(initial=0)) > 15:
        raise ValueError("MatMulNBits codes must be a uint8 [K, N] array in 0..15")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"MatMulNBits needs a power-of-two block size >= 16, got {block_size}")
    k, n = codes.shape
    blocks = -(-k // block_size)
    padded = np.zeros((n, blocks * block_size), dtype=np.uint8)
    padded[:, :k] = codes.T
    pairs = padded.reshape(n, blocks, block_size // 2, 2)
    return np.ascontiguousarray(pairs[..., 0] | (pairs[..., 1] << 4))


def pack_matmulnbits_zero_points(zero_points: np.ndarray) -> np.ndarray:
    """4-bit zero points ``[G, N]`` (per-OC groups) as ``MatMulNBits`` wants them: ``[N * ceil(G/2)]``, two per byte."""
    zero_points = np.asarray(zero_points, dtype=np.uint8)
    groups, n = zero_points.shape
    padded = np.zeros((n, groups + groups % 2), dtype=np.uint8)
    padded[:, :groups] = zero_points.T
    return np.ascontiguousarray((padded[:, 0::2] | (padded[:, 1::2] << 4)).reshape(-1))
