// Code bytes and the int8 dot product of AVX-512 VNNI, shared by the integer kernels (isa_avx512_vnni.cpp,
// int8_avx512_vnni.cpp) and the AVX-512 float kernels (isa_avx512.cpp, CodeBytes only); include only from
// files compiled with -mavx512f -mavx512bw (Dpbusd: run only where the CPU has VNNI). Everything is in an
// anonymous namespace: each file keeps its own copy (see kernels_impl.h).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace lowbit {
namespace {

// acc += 4-byte dot products of u8 codes and s8 digits. Written in asm: GCC 12 copies the accumulator
// around _mm512_dpbusd_epi32 in these loops (about 30 extra moves per 256 weights).
inline void Dpbusd(__m512i& acc, __m512i codes, __m512i digits) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(codes), "v"(digits));
}

// Fields u[64cb .. 64cb + 63] of a 2-bit layout (kernels/packing.py) as bytes.
inline __m512i TwoBitBytes(const uint8_t* layout, int cb) {
  return _mm512_and_si512(_mm512_srli_epi16(_mm512_loadu_si512(layout), 2 * cb), _mm512_set1_epi8(3));
}

// bytes + value where bits 64cb .. 64cb + 63 of a 256-bit plane are set.
inline __m512i PlusPlane(__m512i bytes, const uint8_t* plane, int cb, int value) {
  uint64_t bits;
  std::memcpy(&bits, plane + 8 * cb, 8);
  return _mm512_mask_add_epi8(bytes, _cvtu64_mask64(bits), bytes, _mm512_set1_epi8(static_cast<char>(value)));
}

// The codes of columns 16cb .. 16cb + 15 (4 input channels each) of a packed block as 64 bytes.
template <int Bits>
__m512i CodeBytes(const uint8_t* block, int cb) {
  if (Bits == 8) return _mm512_loadu_si512(block + 64 * cb);
  if (Bits == 2 || Bits == 3) {
    const __m512i low = TwoBitBytes(block, cb);
    return Bits == 2 ? low : PlusPlane(low, block + 64, cb, 4);
  }
  const __m512i bytes = _mm512_loadu_si512(block + 64 * (cb & 1));  // the 4-bit layout's low nibbles
  const __m512i low = _mm512_and_si512(cb < 2 ? bytes : _mm512_srli_epi16(bytes, 4), _mm512_set1_epi8(15));
  if (Bits == 4) return low;
  if (Bits == 5) return PlusPlane(low, block + 128, cb, 16);
  return _mm512_or_si512(low, _mm512_slli_epi16(TwoBitBytes(block + 128, cb), 4));  // 6: bits 4-5 in 2-bit layout
}

}  // namespace
}  // namespace lowbit
