// AVX2 + FMA kernels; compiled with -mavx2 -mfma, run only where the CPU has both (quant_matmul.cpp).
#include <immintrin.h>

#include "avx2_codes.h"
#include "kernels_impl.h"
#include "quant_matmul.h"

namespace lowbit {
namespace {

struct Avx2 {
  static constexpr int W = 8, kNR = 2;
  using F = __m256;
  static F Zero() { return _mm256_setzero_ps(); }
  static F Set1(float x) { return _mm256_set1_ps(x); }
  static F Load(const float* p) { return _mm256_loadu_ps(p); }
  static void Store(float* p, F x) { _mm256_storeu_ps(p, x); }
  static F Sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F Mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F FMAdd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }

  // 3-, 5- and 6-bit blocks become one byte per code, the 8-bit layout (kernels/packing.py; avx2_codes.h).
  template <int Bits>
  static const uint8_t* Expand(const uint8_t* block, uint8_t* buffer) {
    if (!kExpanded<Bits>) return block;
    for (int v = 0; v < 8; ++v)
      _mm256_store_si256(reinterpret_cast<__m256i*>(buffer + 32 * v), CodeBytes<Bits>(block, v));
    return buffer;
  }

  // 2^23 + the codes of columns 8v .. 8v + 7, input channel j, of a block as Expand left it.
  // Lane l reads the 32-bit word that holds column 8v + l's four input channels, one per byte or nibble.
  template <int Bits>
  static F Decode(const uint8_t* block, int j, int v) {
    __m256i q;
    if (Bits == 8 || kExpanded<Bits>) {
      q = Field(block + 32 * v, 8 * j, 0xFF);
    } else if (Bits == 4) {  // columns 32.. in the high nibbles
      q = Field(block + 32 * (v & 3), 8 * j + 4 * (v >> 2), 15);
    } else {  // 2-bit field: 16 columns per bit pair
      q = Field(block + 32 * (v & 1), 8 * j + 2 * (v >> 1), 3);
    }
    return _mm256_castsi256_ps(_mm256_or_si256(q, _mm256_set1_epi32(0x4B000000)));
  }

  // (32-bit words at p >> shift) & mask
  static __m256i Field(const uint8_t* p, int shift, int mask) {
    const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm256_and_si256(_mm256_srli_epi32(words, shift), _mm256_set1_epi32(mask));
  }
};

}  // namespace

const IsaKernels kAvx2Kernels = MakeKernels<Avx2>("avx2");

}  // namespace lowbit
