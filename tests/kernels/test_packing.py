"""Packing of codes into the kernels' tiled layout: round trips (hypothesis), sizes and the documented bit placement."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lowbit.kernels import packing
from lowbit.passes.quant.scheme import SUPPORTED_BITS as BITS


@st.composite
def codes_and_bits(draw):
    bits = draw(st.sampled_from(BITS))
    k, n = draw(st.integers(1, 9)), draw(st.integers(1, 200))
    codes = draw(arrays(np.uint8, (k, n), elements=st.integers(0, (1 << bits) - 1)))
    return codes, bits


@settings(max_examples=300, deadline=None)
@given(codes_and_bits())
def test_unpack_inverts_pack(case):
    codes, bits = case
    packed = packing.pack(codes, bits)
    assert packed.dtype == np.uint8
    assert packed.shape == packing.packed_shape(bits, *codes.shape)
    np.testing.assert_array_equal(packing.unpack(packed, bits, *codes.shape), codes)


@pytest.mark.parametrize("bits", BITS)
def test_a_weight_costs_bits_over_eight_bytes(bits):
    codes = np.zeros((128, 4096), dtype=np.uint8)
    assert packing.pack(codes, bits).nbytes == codes.size * bits // 8


def test_tails_are_padded_with_zero_codes():
    packed = packing.pack(np.full((5, 65), 15, dtype=np.uint8), 4)
    assert packed.shape == (2, 2, 128)
    corner = packed[1, 1]  # column 64 and input channel 4 only: u[0] = 15, the low nibble of byte 0
    assert corner[0] == 15 and not corner[1:].any()


def block_order(codes: np.ndarray) -> np.ndarray:
    """u[4c + j] of the first (tile, quad) block of ``codes`` [4, 64]."""
    return codes.T.reshape(-1)


def test_bit_placement_within_a_block():
    rng = np.random.default_rng(0)
    for bits in BITS:
        codes = rng.integers(0, 1 << bits, size=(4, 64), dtype=np.uint8)
        u = block_order(codes)
        block = packing.pack(codes, bits)[0, 0]
        if bits == 8:
            np.testing.assert_array_equal(block, u)
        elif bits == 4:
            np.testing.assert_array_equal(block, u[:128] | u[128:] << 4)
        elif bits == 2:
            np.testing.assert_array_equal(block, two_bit_layout(u))
        elif bits == 3:
            np.testing.assert_array_equal(block[:64], two_bit_layout(u & 3))
            assert block[64:].tobytes() == plane(u >> 2)
        elif bits == 5:
            np.testing.assert_array_equal(block[:128], (u & 15)[:128] | (u & 15)[128:] << 4)
            assert block[128:].tobytes() == plane(u >> 4)
        else:
            assert bits == 6
            np.testing.assert_array_equal(block[:128], (u & 15)[:128] | (u & 15)[128:] << 4)
            np.testing.assert_array_equal(block[128:], two_bit_layout(u >> 4))


def two_bit_layout(u: np.ndarray) -> np.ndarray:
    """64 bytes: byte i holds u[i], u[i + 64], u[i + 128], u[i + 192] in bits 0-1, 2-3, 4-5, 6-7."""
    return u[:64] | u[64:128] << 2 | u[128:192] << 4 | u[192:] << 6


def plane(bit: np.ndarray) -> bytes:
    """32 bytes, bit i of the little-endian 256-bit number = bit[i]."""
    return sum(int(b & 1) << i for i, b in enumerate(bit)).to_bytes(32, "little")


@pytest.mark.parametrize(
    "codes, bits, message",
    [
        (np.zeros((2, 2), np.uint8), 7, "bits"),
        (np.full((2, 2), 16, np.uint8), 4, "codes must be uint8"),
        (np.zeros((2, 2), np.int32), 4, "codes must be uint8"),
        (np.zeros((0, 2), np.uint8), 4, "non-empty"),
    ],
)
def test_pack_rejects_bad_input(codes, bits, message):
    with pytest.raises(ValueError, match=message):
        packing.pack(codes, bits)


def test_unpack_checks_the_shape():
    with pytest.raises(ValueError, match="packed codes must be uint8 of shape"):
        packing.unpack(np.zeros((1, 3, 128), np.uint8), 4, 3, 10)


def test_the_cpp_kernel_accepts_exactly_the_supported_bits():
    """One list of bit widths (lowbit.passes.quant.scheme.SUPPORTED_BITS): the packing code imports it, and the C++
    kernel's check must name the same set."""
    import pathlib
    import re

    from lowbit.passes.quant.scheme import SUPPORTED_BITS

    assert packing.SUPPORTED_BITS is SUPPORTED_BITS
    source = (pathlib.Path(packing.__file__).parent / "cpu" / "op_io.cpp").read_text()
    (check,) = re.findall(r"if \(((?:bits != \d+(?: && )?)+)\)\s+FailOp\(op, \"bits must be", source)
    assert tuple(sorted(int(value) for value in re.findall(r"bits != (\d+)", check))) == SUPPORTED_BITS
