// AVX2 int8-activation primitives (int8.h); compiled with -mavx2 -mfma, run only where the CPU has both.
//
// vpmaddubsw multiplies u8 codes by s8 activation codes and adds adjacent pairs with int16 saturation;
// vpmaddwd by ones then adds the pairs of a column's quad into int32. Codes of b < 8 bits keep a pair within
// 2 * (2^b - 1) * 127, so the pair sums of several quads (8 at 4 bits, 2 at 6) still add up exactly in int16
// before one vpmaddwd; 8-bit codes would saturate (2 * 255 * 127 > 2^15), so they are split into their low 7
// bits and bit 7, two exact products combined in int32.
#include <immintrin.h>

#include "avx2_codes.h"
#include "int8.h"
#include "prefetch.h"

namespace lowbit {
namespace {

constexpr int kDecodedLayout = 0;  // a Layout value: codes already one per byte (int8.h's decoded scratch)
constexpr int kMaxInputs = (kActivationBlock / kQuad + 1) * kQuad;  // of a block, from its first quad

// Per column (int32 lane): the dot product of its 4 8-bit code bytes with the 4 activation codes of d.
__m256i Dot8(__m256i codes, __m256i d) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i low = _mm256_and_si256(codes, _mm256_set1_epi8(0x7F));
  const __m256i high = _mm256_and_si256(_mm256_srli_epi16(codes, 7), _mm256_set1_epi8(1));
  return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(low, d), ones),
                          _mm256_slli_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(high, d), ones), 7));
}

// Quads whose vpmaddubsw pair sums (each at most 2 * (2^Bits - 1) * 127) add up within int16.
template <int Bits>
constexpr int64_t kInt16Quads = 32767 / (2 * ((1 << Bits) - 1) * kInt8Limit);

int64_t Min(int64_t a, int64_t b) { return a < b ? a : b; }

// The 8 zero points (bytes) at z as floats.
__m256 ZeroPoints(const uint8_t* z) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(z))));
}

// acc[v] = the int32 sums of column vector v over the block's quads (codes of Bits bits in Layout). Codes of
// fewer than 8 bits sum kInt16Quads<Bits> quads in int16 before vpmaddwd widens them, 4 column vectors at a
// time (registers).
template <int Layout, int Bits>
__attribute__((always_inline)) inline void Sums(const uint8_t* codes, int64_t block_bytes, int64_t quads,
                                                const int32_t* words, __m256i* acc) {
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (Bits == 8) {
#pragma GCC unroll 8
    for (int v = 0; v < 8; ++v) acc[v] = _mm256_setzero_si256();
    for (int64_t q = 0; q < quads; ++q) {
      PrefetchBlock(codes + q * block_bytes, block_bytes);  // 8-bit codes are read from the weight
      const __m256i d = _mm256_set1_epi32(words[q]);
#pragma GCC unroll 8
      for (int v = 0; v < 8; ++v)
        acc[v] = _mm256_add_epi32(acc[v], Dot8(CodeBytes<8>(codes + q * block_bytes, v), d));
    }
    return;
  }
#pragma GCC unroll 2
  for (int half = 0; half < 2; ++half) {
    __m256i wide[4];
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) wide[v] = _mm256_setzero_si256();
    for (int64_t q0 = 0; q0 < quads; q0 += kInt16Quads<Bits>) {
      __m256i narrow[4];
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) narrow[v] = _mm256_setzero_si256();
      for (int64_t q = q0, q1 = Min(quads, q0 + kInt16Quads<Bits>); q < q1; ++q) {
        if (Layout != kDecodedLayout && half == 0) PrefetchBlock(codes + q * block_bytes, block_bytes);
        const __m256i d = _mm256_set1_epi32(words[q]);
#pragma GCC unroll 4
        for (int v = 0; v < 4; ++v)
          narrow[v] = _mm256_add_epi16(
              narrow[v], _mm256_maddubs_epi16(CodeBytes<Layout>(codes + q * block_bytes, 4 * half + v), d));
      }
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) wide[v] = _mm256_add_epi32(wide[v], _mm256_madd_epi16(narrow[v], ones));
    }
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) acc[4 * half + v] = wide[v];
  }
}

// Row r of the tile: integer sums over the block's quads, then the epilogue into out.
template <int Layout, int Bits>
void Row(const Int8Tile& t, const uint8_t* codes, int64_t block_bytes, int64_t r) {
  __m256i acc[8];
  Sums<Layout, Bits>(codes, block_bytes, t.quads, t.words + r * t.word_stride, acc);
  const __m256 act = _mm256_set1_ps(t.act_scale[r * t.param_stride]);
  const __m256 corr = _mm256_set1_ps(static_cast<float>(t.corr[r * t.param_stride]));
  float* out = t.out + r * kTile;
#pragma GCC unroll 8
  for (int v = 0; v < 8; ++v) {  // exact in float (int8.h); unrolled: the accumulators stay in registers
    const __m256 total = _mm256_cvtepi32_ps(acc[v]);
    const __m256 sum =
        t.col_zero ? _mm256_fnmadd_ps(ZeroPoints(t.col_zero + 8 * v), corr, total) : _mm256_sub_ps(total, corr);
    const __m256 scale = t.col_scale ? _mm256_mul_ps(act, _mm256_loadu_ps(t.col_scale + 8 * v)) : act;
    _mm256_storeu_ps(out + 8 * v, _mm256_fmadd_ps(sum, scale, _mm256_loadu_ps(out + 8 * v)));
  }
}

// Several rows share one unpacking of the codes to bytes (8-bit codes are bytes already).
template <int Bits>
void TileBits(const Int8Tile& t) {
  if (Bits == 8 || t.rows == 1) {
    for (int64_t r = 0; r < t.rows; ++r) Row<Bits, Bits>(t, t.codes, t.block_bytes, r);
    return;
  }
  for (int64_t q = 0; q < t.quads; ++q) {
    PrefetchBlock(t.codes + q * t.block_bytes, t.block_bytes);
    for (int v = 0; v < 8; ++v)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(t.decoded + q * kTile * kQuad + 32 * v),
                          CodeBytes<Bits>(t.codes + q * t.block_bytes, v));
  }
  for (int64_t r = 0; r < t.rows; ++r) Row<kDecodedLayout, Bits>(t, t.decoded, kTile * kQuad, r);
}

void Tile(const Int8Tile& t) {
  WithBits(t.bits, [&](auto bits) { TileBits<decltype(bits)::value>(t); });
}

// Lanes of k = base .. base + 7 inside [k0, k1), as maskload wants them.
__m256i InputMask(int64_t base, int64_t k0, int64_t k1) {
  const __m256i k =
      _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(base)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i below_end = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(k1)), k);
  const __m256i before_start = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(k0)), k);
  return _mm256_andnot_si256(before_start, below_end);
}

uint32_t HorizontalMax(__m256i v) {
  __m128i m = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4E));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(_mm_max_epu32(m, _mm_shuffle_epi32(m, 0xB1))));
}

int32_t HorizontalSum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

// kWhole: the block is whole steps of 32 inputs from its first quad (the common case; no lane masks).
template <bool kWhole>
float QuantizeBlock(const float* x, const float* scale, const uint8_t* zero, const Int8Block& b, int32_t* words,
                    int32_t* corr) {
  alignas(32) float xs[kMaxInputs + 32];
  const int64_t first = b.q0 * kQuad, inputs = (b.q1 - b.q0) * kQuad, count = b.q1 - b.q0;
  const int64_t padded = (inputs + 31) / 32 * 32;  // whole steps of 32 for the second loop, zeros past the block
  __m256i vmax = _mm256_setzero_si256();          // of |xs| as bit patterns: the order of the floats, NaN above Inf
  for (int64_t i = 0; i < padded; i += 8) {
    const __m256i mask = kWhole ? _mm256_set1_epi32(-1) : InputMask(first + i, b.k0, b.k1);
    __m256 v = kWhole ? _mm256_loadu_ps(x + first + i) : _mm256_maskload_ps(x + first + i, mask);
    if (scale)
      v = _mm256_mul_ps(v, kWhole ? _mm256_loadu_ps(scale + first + i) : _mm256_maskload_ps(scale + first + i, mask));
    _mm256_store_ps(xs + i, v);
    vmax = _mm256_max_epu32(vmax, _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7FFFFFFF)));
  }
  const uint32_t amax_bits = HorizontalMax(vmax);
  float amax;
  std::memcpy(&amax, &amax_bits, 4);
  const bool finite = amax_bits < 0x7F800000u;  // below the bits of Inf
  const float act = amax / static_cast<float>(kInt8Limit), inverse = 1.0f / act;
  if (!(finite && act > 0.0f && __builtin_isfinite(inverse))) {  // codes 0
    for (int64_t i = 0; i < count; ++i) words[i] = 0;
    *corr = 0;
    return finite ? act : __builtin_nanf("");
  }
  const __m256 up = _mm256_set1_ps(inverse);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i sums = _mm256_setzero_si256();
  for (int64_t i = 0; i < inputs; i += 32) {
    __m256i code[4];
    for (int v = 0; v < 4; ++v) code[v] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(xs + i + 8 * v), up));
    // int32 -> int8 in order: the packs work per 128-bit lane, the permutation puts the words back in order
    const __m256i bytes = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(code[0], code[1]), _mm256_packs_epi32(code[2], code[3])), order);
    if (kWhole) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(words + i / kQuad), bytes);
    } else {
      const __m256i store = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(count - i / kQuad)),
                                               _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      _mm256_maskstore_epi32(words + i / kQuad, store, bytes);
    }
    if (zero) {  // codes past the block are 0: the zero-point bytes read there do not count
      const __m256i z = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(zero + first + i));
      const __m256i low = _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm256_castsi256_si128(bytes)),
                                            _mm256_cvtepu8_epi16(_mm256_castsi256_si128(z)));
      const __m256i high = _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm256_extracti128_si256(bytes, 1)),
                                             _mm256_cvtepu8_epi16(_mm256_extracti128_si256(z, 1)));
      sums = _mm256_add_epi32(sums, _mm256_add_epi32(low, high));
    } else {
      const __m256i pairs = _mm256_add_epi32(_mm256_add_epi32(code[0], code[1]), _mm256_add_epi32(code[2], code[3]));
      sums = _mm256_add_epi32(sums, pairs);
    }
  }
  *corr = HorizontalSum(sums);
  return act;
}

float Quantize(const float* x, const float* scale, const uint8_t* zero, const Int8Block& b, int32_t* words,
               int32_t* corr) {
  const bool whole = b.k0 == b.q0 * kQuad && (b.k1 - b.k0) % 32 == 0;
  return whole ? QuantizeBlock<true>(x, scale, zero, b, words, corr)
               : QuantizeBlock<false>(x, scale, zero, b, words, corr);
}

}  // namespace

const Int8Kernels kInt8Avx2Kernels{"avx2", &Quantize, &Tile, nullptr};

}  // namespace lowbit
