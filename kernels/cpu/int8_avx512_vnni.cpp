// AVX-512 VNNI int8-activation primitives (int8.h); compiled with -mavx512f -mavx512bw -mavx512vnni, run
// only where the CPU has them. The one-limb form of isa_avx512_vnni.cpp's exact integer path: vpdpbusd
// multiplies 64 u8 codes by s8 activation codes and adds each column's 4 products into int32 (no
// saturation, 8-bit codes included). Up to 4 rows share every load of the codes.
#include <immintrin.h>

#include <cstring>

#include "int8.h"
#include "prefetch.h"
#include "vnni_codes.h"

namespace lowbit {
namespace {

constexpr int kRowsAtOnce = 4;
constexpr int kMaxInputs = (kActivationBlock / kQuad + 1) * kQuad;  // of a block, from its first quad

// The 16 zero points (bytes) at z as floats.
__m512 ZeroPoints(const uint8_t* z) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z))));
}

// Rows r0 .. r0 + R - 1 of the tile: integer sums over the block's quads, then the epilogue into out. (One
// flat array of accumulators, always inlined: only so does GCC 12 keep them in registers.) kPacked: the codes
// are the weight's (prefetched ahead), not the decoded scratch.
template <int Bits, int R, bool kPacked>
__attribute__((always_inline)) inline void Rows(const Int8Tile& t, const uint8_t* codes, int64_t block_bytes,
                                                int64_t r0) {
  __m512i acc[R * 4];  // [row][column block]
#pragma GCC unroll 16
  for (int i = 0; i < R * 4; ++i) acc[i] = _mm512_setzero_si512();
  const int32_t* words = t.words + r0 * t.word_stride;
  for (int64_t q = 0; q < t.quads; ++q) {
    const uint8_t* block = codes + q * block_bytes;
    if (kPacked) PrefetchBlock(block, block_bytes);
    __m512i d[R], bytes[4];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) d[r] = _mm512_set1_epi32(words[r * t.word_stride + q]);
#pragma GCC unroll 4
    for (int cb = 0; cb < 4; ++cb) bytes[cb] = CodeBytes<Bits>(block, cb);
#pragma GCC unroll 16
    for (int i = 0; i < R * 4; ++i) Dpbusd(acc[i], bytes[i % 4], d[i / 4]);
  }
  __m512 zero[4];  // the rows share them (converted once: the stores to out may alias the bytes)
#pragma GCC unroll 4
  for (int cb = 0; cb < 4; ++cb) zero[cb] = t.col_zero ? ZeroPoints(t.col_zero + 16 * cb) : _mm512_set1_ps(1.0f);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const __m512 act = _mm512_set1_ps(t.act_scale[(r0 + r) * t.param_stride]);
    const __m512 corr = _mm512_set1_ps(static_cast<float>(t.corr[(r0 + r) * t.param_stride]));
    float* out = t.out + (r0 + r) * kTile;
#pragma GCC unroll 4
    for (int cb = 0; cb < 4; ++cb) {  // exact in float (int8.h)
      const __m512 total = _mm512_cvtepi32_ps(acc[r * 4 + cb]);
      const __m512 sum = _mm512_fnmadd_ps(zero[cb], corr, total);
      const __m512 scale = t.col_scale ? _mm512_mul_ps(act, _mm512_loadu_ps(t.col_scale + 16 * cb)) : act;
      _mm512_storeu_ps(out + 16 * cb, _mm512_fmadd_ps(sum, scale, _mm512_loadu_ps(out + 16 * cb)));
    }
  }
}

template <int Bits, bool kPacked>
void AllRows(const Int8Tile& t, const uint8_t* codes, int64_t block_bytes) {
  int64_t r = 0;
  for (; r + kRowsAtOnce <= t.rows; r += kRowsAtOnce) Rows<Bits, kRowsAtOnce, kPacked>(t, codes, block_bytes, r);
  switch (t.rows - r) {
    case 3: return Rows<Bits, 3, kPacked>(t, codes, block_bytes, r);
    case 2: return Rows<Bits, 2, kPacked>(t, codes, block_bytes, r);
    case 1: return Rows<Bits, 1, kPacked>(t, codes, block_bytes, r);
    default: return;
  }
}

// More rows than one call of Rows share one unpacking of the codes to bytes (8-bit codes are bytes already).
template <int Bits>
void TileBits(const Int8Tile& t) {
  if (Bits == 8 || t.rows <= kRowsAtOnce) return AllRows<Bits, true>(t, t.codes, t.block_bytes);
  for (int64_t q = 0; q < t.quads; ++q) {
    PrefetchBlock(t.codes + q * t.block_bytes, t.block_bytes);
    for (int cb = 0; cb < 4; ++cb)
      _mm512_storeu_si512(t.decoded + q * kTile * kQuad + 64 * cb, CodeBytes<Bits>(t.codes + q * t.block_bytes, cb));
  }
  AllRows<8, false>(t, t.decoded, kTile * kQuad);
}

void Tile(const Int8Tile& t) {
  WithBits(t.bits, [&](auto bits) { TileBits<decltype(bits)::value>(t); });
}

// One row, S tiles at once (Int8Tiles): each quad step reads a block of every tile, so S streams of the
// weight are in flight. Same arithmetic as Rows<Bits, 1, true>.
template <int Bits, int S>
void TilesBits(const Int8Tiles& t) {
  __m512i acc[S * 4];  // [tile][column block]
#pragma GCC unroll 16
  for (int i = 0; i < S * 4; ++i) acc[i] = _mm512_setzero_si512();
  for (int64_t q = 0; q < t.quads; ++q) {
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s) {
      const uint8_t* block = t.codes[s] + q * t.block_bytes;
      PrefetchBlock(block, t.block_bytes);
      const __m512i d = _mm512_set1_epi32(t.words[s][q]);
#pragma GCC unroll 4
      for (int cb = 0; cb < 4; ++cb) Dpbusd(acc[s * 4 + cb], CodeBytes<Bits>(block, cb), d);
    }
  }
#pragma GCC unroll 4
  for (int s = 0; s < S; ++s) {
    const __m512 act = _mm512_set1_ps(t.act_scale[s]);
    const __m512 corr = _mm512_set1_ps(static_cast<float>(t.corr[s]));
#pragma GCC unroll 4
    for (int cb = 0; cb < 4; ++cb) {  // exact in float (int8.h)
      const __m512 total = _mm512_cvtepi32_ps(acc[s * 4 + cb]);
      const __m512 sum = t.col_zero[s] ? _mm512_fnmadd_ps(ZeroPoints(t.col_zero[s] + 16 * cb), corr, total)
                                       : _mm512_sub_ps(total, corr);
      const __m512 scale = t.col_scale[s] ? _mm512_mul_ps(act, _mm512_loadu_ps(t.col_scale[s] + 16 * cb)) : act;
      float* out = t.out[s] + 16 * cb;
      _mm512_storeu_ps(out, _mm512_fmadd_ps(sum, scale, _mm512_loadu_ps(out)));
    }
  }
}

template <int Bits>
void TilesCount(const Int8Tiles& t) {
  switch (t.count) {
    case 4: return TilesBits<Bits, 4>(t);
    case 3: return TilesBits<Bits, 3>(t);
    case 2: return TilesBits<Bits, 2>(t);
    default: return TilesBits<Bits, 1>(t);
  }
}

void Tiles(const Int8Tiles& t) {
  static_assert(kInt8MaxTiles == 4, "TilesCount handles 1 to 4 tiles");
  WithBits(t.bits, [&](auto bits) { TilesCount<decltype(bits)::value>(t); });
}

// Lanes of k = base .. base + 15 inside [k0, k1).
__mmask16 InputMask(int64_t base, int64_t k0, int64_t k1) {
  const int64_t low = k0 - base > 0 ? k0 - base : 0, high = k1 - base < 16 ? k1 - base : 16;
  if (high <= low) return 0;
  return static_cast<__mmask16>(((1u << high) - 1) & ~((1u << low) - 1));
}

// kWhole: the block is whole steps of 16 inputs from its first quad (the common case; no lane masks).
template <bool kWhole>
float QuantizeBlock(const float* x, const float* scale, const uint8_t* zero, const Int8Block& b, int32_t* words,
                    int32_t* corr) {
  alignas(64) float xs[kMaxInputs + 16];
  const int64_t first = b.q0 * kQuad, inputs = (b.q1 - b.q0) * kQuad, count = b.q1 - b.q0;
  auto tail = [](int64_t left) { return static_cast<__mmask16>(left < 16 ? (1u << left) - 1 : 0xFFFF); };
  __m512i vmax = _mm512_setzero_si512();  // of |xs| as bit patterns: the order of the floats, NaN above Inf
  for (int64_t i = 0; i < inputs; i += 16) {
    const __mmask16 m = kWhole ? 0xFFFF : InputMask(first + i, b.k0, b.k1);
    __m512 v = _mm512_maskz_loadu_ps(m, x + first + i);
    if (scale) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, scale + first + i));
    _mm512_store_ps(xs + i, v);
    vmax = _mm512_max_epu32(vmax, _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7FFFFFFF)));
  }
  const uint32_t amax_bits = _mm512_reduce_max_epu32(vmax);
  float amax;
  std::memcpy(&amax, &amax_bits, 4);
  const bool finite = amax_bits < 0x7F800000u;  // below the bits of Inf
  const float act = amax / static_cast<float>(kInt8Limit), inverse = 1.0f / act;
  if (!(finite && act > 0.0f && __builtin_isfinite(inverse))) {  // codes 0
    for (int64_t i = 0; i < count; ++i) words[i] = 0;
    *corr = 0;
    return finite ? act : __builtin_nanf("");
  }
  const __m512 up = _mm512_set1_ps(inverse);
  for (int64_t i = 0; i < inputs; i += 16) {
    const __m512i code = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_load_ps(xs + i), up));
    _mm512_mask_cvtepi32_storeu_epi8(reinterpret_cast<int8_t*>(words) + i, kWhole ? 0xFFFF : tail(inputs - i), code);
  }
  // corr: the words' dot products with the zero-point bytes (or ones)
  __m512i sums = _mm512_setzero_si512();
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 m = tail(count - i);
    const __m512i z = zero ? _mm512_maskz_loadu_epi32(m, zero + first + kQuad * i) : _mm512_set1_epi8(1);
    sums = _mm512_dpbusd_epi32(sums, z, _mm512_maskz_loadu_epi32(m, words + i));
  }
  *corr = _mm512_reduce_add_epi32(sums);
  return act;
}

// B blocks of one row, each of 64 V inputs from its first quad (V = 1, 2: 64 or 128 inputs, the usual
// blocks), kept in registers from the load to the codes: QuantizeBlock<true>'s arithmetic without its round
// trips through memory (its byte stores, read back at once as words, stalled on store forwarding), and the
// B blocks' reductions and divisions side by side instead of one chain after another. False (nothing
// written) where a block has no usable scale: those go through QuantizeBlock.
template <int V, int B>
bool QuantizeRegisters(const float* x, const float* scale, const uint8_t* zero, const Int8Block* blocks,
                       int32_t* words, float* act_out, int32_t* corr_out) {
  __m512 v[B][4 * V];
  float inverse[B];
#pragma GCC unroll 4
  for (int b = 0; b < B; ++b) {
    const int64_t first = blocks[b].q0 * kQuad;
    __m512i vmax = _mm512_setzero_si512();  // of |xs| as bit patterns: the order of the floats, NaN above Inf
#pragma GCC unroll 8
    for (int i = 0; i < 4 * V; ++i) {
      v[b][i] = _mm512_loadu_ps(x + first + 16 * i);
      if (scale) v[b][i] = _mm512_mul_ps(v[b][i], _mm512_loadu_ps(scale + first + 16 * i));
      vmax = _mm512_max_epu32(vmax, _mm512_and_si512(_mm512_castps_si512(v[b][i]), _mm512_set1_epi32(0x7FFFFFFF)));
    }
    const uint32_t amax_bits = _mm512_reduce_max_epu32(vmax);
    float amax;
    std::memcpy(&amax, &amax_bits, 4);
    act_out[b] = amax / static_cast<float>(kInt8Limit);
    inverse[b] = 1.0f / act_out[b];
    if (!(amax_bits < 0x7F800000u && act_out[b] > 0.0f && __builtin_isfinite(inverse[b]))) return false;
  }
  // |code| <= 127: the saturating packs keep every code. Per 128-bit lane l they leave the 4-code dwords in
  // the order (l, vector), the permutation puts them back in the order (vector, l).
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
#pragma GCC unroll 4
  for (int b = 0; b < B; ++b) {
    const int64_t first = blocks[b].q0 * kQuad;
    const __m512 up = _mm512_set1_ps(inverse[b]);
    __m512i sums = _mm512_setzero_si512();
#pragma GCC unroll 2
    for (int i = 0; i < V; ++i) {
      __m512i c[4];
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) c[j] = _mm512_cvtps_epi32(_mm512_mul_ps(v[b][4 * i + j], up));
      const __m512i bytes = _mm512_permutexvar_epi32(
          order, _mm512_packs_epi16(_mm512_packs_epi32(c[0], c[1]), _mm512_packs_epi32(c[2], c[3])));
      _mm512_storeu_si512(words + blocks[b].word + 16 * i, bytes);
      // corr: the words' dot products with the zero-point bytes (or ones)
      const __m512i z = zero ? _mm512_loadu_si512(zero + first + 64 * i) : _mm512_set1_epi8(1);
      sums = _mm512_dpbusd_epi32(sums, z, bytes);
    }
    corr_out[b] = _mm512_reduce_add_epi32(sums);
  }
  return true;
}

float Quantize(const float* x, const float* scale, const uint8_t* zero, const Int8Block& b, int32_t* words,
               int32_t* corr) {
  const bool whole = b.k0 == b.q0 * kQuad && (b.k1 - b.k0) % 16 == 0;
  return whole ? QuantizeBlock<true>(x, scale, zero, b, words, corr)
               : QuantizeBlock<false>(x, scale, zero, b, words, corr);
}

// Inputs [64 V) from the block's first quad, exactly.
template <int V>
bool Fits(const Int8Block& b) {
  return b.k0 == b.q0 * kQuad && b.k1 - b.k0 == 64 * V;
}

void QuantizeBlocks(const float* x, const float* scale, const uint8_t* zero, const Int8Block* blocks,
                    int64_t count, int32_t* words, float* act, int32_t* corr) {
  int64_t i = 0;
  while (i < count) {
    if (i + 2 <= count && Fits<2>(blocks[i]) && Fits<2>(blocks[i + 1]) &&
        QuantizeRegisters<2, 2>(x, scale, zero, blocks + i, words, act + i, corr + i)) {
      i += 2;
    } else if (i + 4 <= count && Fits<1>(blocks[i]) && Fits<1>(blocks[i + 1]) && Fits<1>(blocks[i + 2]) &&
               Fits<1>(blocks[i + 3]) && QuantizeRegisters<1, 4>(x, scale, zero, blocks + i, words, act + i, corr + i)) {
      i += 4;
    } else {
      act[i] = Quantize(x, scale, zero, blocks[i], words + blocks[i].word, corr + i);
      ++i;
    }
  }
}

}  // namespace

const Int8Kernels kInt8Avx512VnniKernels{"avx512vnni", &Quantize, &Tile, &Tiles, &QuantizeBlocks};

}  // namespace lowbit
