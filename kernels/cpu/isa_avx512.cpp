// AVX-512 (F + BW) kernels; compiled with -mavx512f -mavx512bw, run only where the CPU has both.
#include <immintrin.h>

#include "kernels_impl.h"
#include "quant_matmul.h"
#include "vnni_codes.h"

namespace lowbit {
namespace {

struct Avx512 {
  static constexpr int W = 16, kNR = 4;
  using F = __m512;
  static F Zero() { return _mm512_setzero_ps(); }
  static F Set1(float x) { return _mm512_set1_ps(x); }
  static F Load(const float* p) { return _mm512_loadu_ps(p); }
  static void Store(float* p, F x) { _mm512_storeu_ps(p, x); }
  static F Sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F Mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F FMAdd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }

  // 3-, 5- and 6-bit blocks become one byte per code, the 8-bit layout (kernels/packing.py; vnni_codes.h).
  template <int Bits>
  static const uint8_t* Expand(const uint8_t* block, uint8_t* buffer) {
    if (!kExpanded<Bits>) return block;
    for (int v = 0; v < 4; ++v) _mm512_store_si512(buffer + 64 * v, CodeBytes<Bits>(block, v));
    return buffer;
  }

  // 2^23 + the codes of columns 16v .. 16v + 15, input channel j, of a block as Expand left it.
  // Lane l reads the 32-bit word that holds column 16v + l's four input channels, one per byte or nibble.
  template <int Bits>
  static F Decode(const uint8_t* block, int j, int v) {
    if (Bits == 8 || kExpanded<Bits>) return MaskOr(Words(block + 64 * v, 8 * j), 0xFF);
    if (Bits == 4) return MaskOr(Words(block + 64 * (v & 1), 8 * j + 4 * (v >> 1)), 15);  // columns 32.. high nibbles
    return MaskOr(Words(block, 8 * j + 2 * v), 3);  // 2-bit field: 16 columns per bit pair
  }

  static __m512i Words(const uint8_t* p, int shift) {  // 32-bit words at p >> shift
    return _mm512_srli_epi32(_mm512_loadu_si512(p), shift);
  }

  // (x & mask) | 0x4B000000 in one ternary-logic instruction, as floats.
  static F MaskOr(__m512i x, int mask) {
    return _mm512_castsi512_ps(
        _mm512_ternarylogic_epi32(x, _mm512_set1_epi32(mask), _mm512_set1_epi32(0x4B000000), 0xEA));
  }
};

}  // namespace

const IsaKernels kAvx512Kernels = MakeKernels<Avx512>("avx512");

}  // namespace lowbit
