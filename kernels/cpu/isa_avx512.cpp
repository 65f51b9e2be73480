// AVX-512 (F + BW) kernels; compiled with -mavx512f -mavx512bw, run only where the CPU has both.
#include <immintrin.h>

#include "kernels_impl.h"
#include "quant_matmul.h"

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

  // 2^23 + the codes of columns 16v .. 16v + 15, input channel j, of a packed block (kernels/packing.py).
  // Lane l reads the 32-bit word that holds column 16v + l's four input channels, one per byte or nibble.
  template <int Bits>
  static F Decode(const uint8_t* block, int j, int v) {
    if (Bits == 8) return MaskOr(Words(block + 64 * v, 8 * j), 0xFF);
    if (Bits == 4) return MaskOr(Words(block + 64 * (v & 1), 8 * j + 4 * (v >> 1)), 15);  // columns 32.. high nibbles
    const F low = MaskOr(Words(block, 8 * j + 2 * v), 3);  // 2-bit field: 16 columns per bit pair
    if (Bits == 2) return low;
    // bit 2 of column 16v + l: bit 4l + j of qword v of the plane (lanes 0-7 its low word, 8-15 its high word)
    const __m512i plane = _mm512_permutexvar_epi32(
        _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
        _mm512_castsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(block + 64 + 8 * v))));
    const __m512i bit =
        _mm512_slli_epi32(_mm512_setr_epi32(1, 1 << 4, 1 << 8, 1 << 12, 1 << 16, 1 << 20, 1 << 24, 1 << 28, 1, 1 << 4,
                                            1 << 8, 1 << 12, 1 << 16, 1 << 20, 1 << 24, 1 << 28),
                          j);
    const __m512i q = _mm512_castps_si512(low);
    return _mm512_castsi512_ps(_mm512_mask_or_epi32(q, _mm512_test_epi32_mask(plane, bit), q, _mm512_set1_epi32(4)));
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
