// AVX2 code bytes of kernels/packing.py's layouts, shared by the AVX2 float kernels (isa_avx2.cpp: 3-, 5- and
// 6-bit blocks expanded to one byte per code) and the AVX2 int8 kernels (int8_avx2.cpp); include only from
// files compiled with -mavx2. Everything is in an anonymous namespace: each file keeps its own copy (see
// kernels_impl.h).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace lowbit {
namespace {

// u[32v .. 32v + 31] of a 2-bit layout (64 bytes) as bytes.
inline __m256i TwoBitBytes(const uint8_t* layout, int v) {
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(layout + 32 * (v & 1)));
  return _mm256_and_si256(_mm256_srli_epi16(bytes, 2 * (v >> 1)), _mm256_set1_epi8(3));
}

// u[32v .. 32v + 31] of a 4-bit layout (128 bytes) as bytes.
inline __m256i NibbleBytes(const uint8_t* layout, int v) {
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(layout + 32 * (v & 3)));
  return _mm256_and_si256(v < 4 ? bytes : _mm256_srli_epi16(bytes, 4), _mm256_set1_epi8(15));
}

// value in the bytes whose bit of a 256-bit plane (bits 32v .. 32v + 31) is set, 0 in the others: the plane's
// dword spread to one byte per bit, then compared.
inline __m256i PlaneBytes(const uint8_t* plane, int v, int value) {
  int32_t bits;
  std::memcpy(&bits, plane + 4 * v, 4);
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(bits), _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2,
                                                3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ull));
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit),
                          _mm256_set1_epi8(static_cast<char>(value)));
}

// 32 code bytes of columns 8v .. 8v + 7 (4 input channels each) of a packed block (u[32v .. 32v + 31]);
// Layout is the bit width, or 0 for a block already one byte per code.
template <int Layout>
__m256i CodeBytes(const uint8_t* block, int v) {
  if (Layout == 8 || Layout == 0) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32 * v));
  if (Layout == 4) return NibbleBytes(block, v);
  if (Layout == 2) return TwoBitBytes(block, v);
  if (Layout == 3) return _mm256_or_si256(TwoBitBytes(block, v), PlaneBytes(block + 64, v, 4));
  if (Layout == 5) return _mm256_or_si256(NibbleBytes(block, v), PlaneBytes(block + 128, v, 16));
  return _mm256_or_si256(NibbleBytes(block, v), _mm256_slli_epi16(TwoBitBytes(block + 128, v), 4));  // 6
}

}  // namespace
}  // namespace lowbit
