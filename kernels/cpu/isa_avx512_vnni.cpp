// QuantMatMul for a few rows with AVX-512 VNNI integer dot products; compiled with -mavx512f -mavx512bw
// -mavx512vnni, run only where the CPU has them (quant_matmul.cpp).
//
// The float GEMV spends 3 of its 4 vector operations per 16 weights turning codes into floats. Here the
// packed bytes feed vpdpbusd (64 u8 x s8 products per instruction) almost as they are, and the
// activations become integers instead: per row and block of up to 128 input channels, xs[k] (x[k] for
// per-OC, x[k] * s[k, group] for per-IC) is scaled by 2^e so that max |xs| * 2^e < 2^30, rounded to an
// int32 X[k] and split into 4 signed bytes (X = d3 2^24 + d2 2^16 + d1 2^8 + d0). Each limb's dot product
// with the codes is exact in int32 (|sum| < 128 * 255 * 128 < 2^24), the zero points are subtracted
// exactly in integers, and the limbs are combined in float once per block. The only rounding besides
// that final combination is X[k]'s: at most 2^-30 of the block's largest |xs| per term, below float32's
// own rounding (2^-24 relative) for every term within 2^6 of the block maximum.
#include <immintrin.h>

#include <cstring>

#include "codes.h"
#include "prefetch.h"
#include "quant_matmul.h"
#include "vnni_codes.h"

namespace lowbit {
namespace {

constexpr int kLimbs = 4;
constexpr int64_t kBlockInputs = 128;  // input channels per exponent block

struct Range {  // an exponent block: quads [q0, q1), inside one per-OC group
  int64_t q0, q1;
};

struct RowBlock {        // one row's exponent block
  float scale;           // 2^-e
  int32_t corr[kLimbs];  // per-IC: sum_k d[L][k] * z[k]; per-OC: sum_k d[L][k] (times z per column later)
};

int64_t Min(int64_t a, int64_t b) { return a < b ? a : b; }

// 2^n as a float, n in [-126, 127]
float Pow2(int n) {
  const int32_t bits = (n + 127) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Splits xs[k] = x[k] * (scale ? scale[k] : 1), k in [k0, k1) (one block, starting on a quad), into limbs.
// digits[4 q + L] is the dword of limb L's bytes for the 4 input channels of quad q: what vpdpbusd takes.
// corr[L] is sum_k d[L][k] * z[k] with zero's z (per-IC), or sum_k d[L][k] without it (per-OC).
// Whole steps of 16 inputs are written: digits past k1 are zeros (overwritten by the next block).
RowBlock MakeBlock(const float* x, const float* scale, const float* zero, int64_t k0, int64_t k1, int32_t* digits,
                   float* xs) {
  __m512 vmax = _mm512_setzero_ps();
  for (int64_t k = k0; k < k1; k += 16) {
    const __mmask16 m = static_cast<__mmask16>((1u << Min(16, k1 - k)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(m, x + k);
    if (scale) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, scale + k));
    _mm512_storeu_ps(xs + (k - k0), v);
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
  }
  const float max_abs = _mm512_reduce_max_ps(vmax);
  int e = 119;  // blocks of zeros or of tiny values: 2^-119 absolute resolution is more than enough
  if (max_abs >= 1e-27f) {
    int32_t bits;
    std::memcpy(&bits, &max_abs, 4);
    e = 29 - (((bits >> 23) & 0xFF) - 127);  // max_abs * 2^e in [2^29, 2^30)
  }
  const __m512 up = _mm512_set1_ps(Pow2(e));
  const __m512i bias = _mm512_set1_epi32(static_cast<int32_t>(0x80808080u));
  // per 128-bit lane (one quad): bytes [k][L] -> [L][k]
  const __m512i transpose = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
  __m512i sums = _mm512_setzero_si512();
  for (int64_t k = k0; k < k1; k += 16) {
    const __mmask16 m = static_cast<__mmask16>((1u << Min(16, k1 - k)) - 1);
    // X = round(xs 2^e), |X| < 2^30; the bytes of X + 0x80808080, each minus 128, are signed digits of X
    const __m512i x_int = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, xs + (k - k0)), up));
    const __m512i limbs = _mm512_shuffle_epi8(_mm512_xor_si512(_mm512_add_epi32(x_int, bias), bias), transpose);
    _mm512_storeu_si512(digits + (k / kQuad) * kLimbs, limbs);
    __m512i weights = _mm512_set1_epi8(1);
    if (zero) {
      const __m512i z = _mm512_cvtps_epi32(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, zero + k), _mm512_set1_ps(kMagic)));
      weights = _mm512_shuffle_epi8(
          z, _mm512_broadcast_i32x4(_mm_setr_epi8(0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12, 0, 4, 8, 12)));
    }
    sums = _mm512_dpbusd_epi32(sums, weights, limbs);  // lane (quad, L) += sum_j w[j] d[L][j]
  }
  RowBlock block{Pow2(-e), {}};
  alignas(64) int32_t lanes[16];
  _mm512_store_si512(lanes, sums);
  for (int limb = 0; limb < kLimbs; ++limb)
    block.corr[limb] = lanes[limb] + lanes[limb + 4] + lanes[limb + 8] + lanes[limb + 12];
  return block;
}

// Everything one thread needs about the rows' activations (in the caller's scratch).
struct Rows {
  int64_t count, quads;
  int32_t* digits;   // [count][quads + 4][kLimbs]
  RowBlock* blocks;  // [count][max ranges]
  int64_t max_ranges;
  float* out;  // [count][kTile]
  const int32_t* Digits(int64_t r) const { return digits + r * (quads + 4) * kLimbs; }
  const RowBlock& Block(int64_t r, int64_t i) const { return blocks[r * max_ranges + i]; }
};

// out[r][0..63] += row r times one range of a tile; codes points to the range's first block, packed
// (kPacked: prefetched ahead) or decoded to bytes. per-OC: zero[cb] are the columns' zero points
// and col_scale their scales; per-IC: both null. (Always inlined, one row at a time: only so does GCC 12
// keep the 16 accumulators in registers; out of line, or with 4 rows at once, it spills them each quad.)
template <int Bits, bool kPacked>
__attribute__((always_inline)) inline void RangeRow(const uint8_t* codes, int64_t block_bytes, Range range,
                                                    int64_t range_index, const Rows& rows, int64_t r,
                                                    const __m512i* zero, const float* col_scale) {
  __m512i acc[4 * kLimbs];  // [column block][limb]
#pragma GCC unroll 16
  for (int i = 0; i < 4 * kLimbs; ++i) acc[i] = _mm512_setzero_si512();
  const int32_t* digits = rows.Digits(r);
  for (int64_t q = range.q0; q < range.q1; ++q) {
    const uint8_t* block = codes + (q - range.q0) * block_bytes;
    if (kPacked) PrefetchBlock(block, block_bytes);
    __m512i d[kLimbs], bytes[4];
#pragma GCC unroll 4
    for (int limb = 0; limb < kLimbs; ++limb) d[limb] = _mm512_set1_epi32(digits[q * kLimbs + limb]);
#pragma GCC unroll 4
    for (int cb = 0; cb < 4; ++cb) bytes[cb] = CodeBytes<Bits>(block, cb);
#pragma GCC unroll 16
    for (int i = 0; i < 4 * kLimbs; ++i) Dpbusd(acc[i], bytes[i / kLimbs], d[i % kLimbs]);
  }
  const RowBlock& rb = rows.Block(r, range_index);
  float* out = rows.out + r * kTile;
  for (int cb = 0; cb < 4; ++cb) {
    __m512 total = _mm512_setzero_ps();
    for (int limb = kLimbs - 1; limb >= 0; --limb) {
      const __m512i corr =
          zero ? _mm512_mullo_epi32(zero[cb], _mm512_set1_epi32(rb.corr[limb])) : _mm512_set1_epi32(rb.corr[limb]);
      total = _mm512_fmadd_ps(total, _mm512_set1_ps(256.0f),
                              _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[cb * kLimbs + limb], corr)));
    }
    const __m512 scale = col_scale ? _mm512_mul_ps(_mm512_loadu_ps(col_scale + 16 * cb), _mm512_set1_ps(rb.scale))
                                   : _mm512_set1_ps(rb.scale);
    _mm512_storeu_ps(out + 16 * cb, _mm512_fmadd_ps(total, scale, _mm512_loadu_ps(out + 16 * cb)));
  }
}

// Every row over one range of a tile. Several rows share one decoding of the codes, to bytes in the 8-bit
// layout (decoded: kBlockInputs / 4 blocks of 256 bytes).
template <int Bits>
void RangeAllRows(const uint8_t* tile, int64_t block_bytes, Range range, int64_t range_index, const Rows& rows,
                  const __m512i* zero, const float* col_scale, uint8_t* decoded) {
  const uint8_t* codes = tile + range.q0 * block_bytes;
  if (Bits == 8 || rows.count == 1) {
    for (int64_t r = 0; r < rows.count; ++r)
      RangeRow<Bits, true>(codes, block_bytes, range, range_index, rows, r, zero, col_scale);
    return;
  }
  for (int64_t q = 0; q < range.q1 - range.q0; ++q) {
    PrefetchBlock(codes + q * block_bytes, block_bytes);
    for (int cb = 0; cb < 4; ++cb)
      _mm512_storeu_si512(decoded + q * 256 + 64 * cb, CodeBytes<Bits>(codes + q * block_bytes, cb));
  }
  for (int64_t r = 0; r < rows.count; ++r)
    RangeRow<8, false>(decoded, 256, range, range_index, rows, r, zero, col_scale);
}

template <int Bits>
void Gemm(const Problem& p, const float* a, int64_t t0, int64_t t1, void* scratch) {
  // scratch: ranges [quads], digits [M][quads + 4][4], xs [128 + 16], out [M][64], decoded [128 * 64],
  // blocks [M][quads]
  const int64_t max_ranges = p.quads;  // every range holds at least one quad
  Range* ranges = static_cast<Range*>(scratch);
  Rows rows{p.M, p.quads, reinterpret_cast<int32_t*>(ranges + max_ranges), nullptr, max_ranges, nullptr};
  float* xs = reinterpret_cast<float*>(rows.digits + p.M * (p.quads + 4) * kLimbs);
  rows.out = xs + kBlockInputs + 16;
  uint8_t* decoded =
      reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(rows.out + p.M * kTile) + 63) & ~uintptr_t{63});
  rows.blocks = reinterpret_cast<RowBlock*>(decoded + kBlockInputs * kTile);

  // exponent blocks: per-OC inside groups, per-IC anywhere
  int64_t num_ranges = 0;
  const int64_t group_inputs = p.group_axis == 0 ? p.group_size : p.K;
  for (int64_t g0 = 0; g0 < p.K; g0 += group_inputs)
    for (int64_t k = g0, end = Min(p.K, g0 + group_inputs); k < end; k += kBlockInputs)
      ranges[num_ranges++] = Range{k / kQuad, (Min(end, k + kBlockInputs) + kQuad - 1) / kQuad};
  auto make_blocks = [&](const float* scale, const float* zero) {
    for (int64_t r = 0; r < p.M; ++r)
      for (int64_t i = 0; i < num_ranges; ++i)
        rows.blocks[r * max_ranges + i] =
            MakeBlock(a + r * p.K, scale, zero, ranges[i].q0 * kQuad, Min(p.K, ranges[i].q1 * kQuad),
                      rows.digits + r * (p.quads + 4) * kLimbs, xs);
  };
  if (p.group_axis == 0) make_blocks(nullptr, nullptr);  // the activations serve every tile

  int64_t blocks_group = -1;
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* tile = p.packed + t * p.quads * p.block_bytes;
    for (int64_t i = 0; i < p.M * kTile; ++i) rows.out[i] = 0.0f;
    if (p.group_axis == 0) {
      for (int64_t i = 0; i < num_ranges; ++i) {
        const int64_t g = ranges[i].q0 * kQuad / p.group_size;
        const float* scale = p.params.scale + (t * p.groups + g) * kTile;
        const float* zero = p.params.zero + (t * p.groups + g) * kTile;
        __m512i z[4];
        for (int cb = 0; cb < 4; ++cb)
          z[cb] = _mm512_cvtps_epi32(_mm512_sub_ps(_mm512_loadu_ps(zero + 16 * cb), _mm512_set1_ps(kMagic)));
        RangeAllRows<Bits>(tile, p.block_bytes, ranges[i], i, rows, z, scale, decoded);
      }
    } else {  // the tile lies in one group (GemmAvx512VnniSupports): its activations are x * s[:, g]
      const int64_t g = Min(t * kTile / p.group_size, p.groups - 1);
      if (g != blocks_group) {
        make_blocks(p.params.scale + g * p.K, p.params.zero + g * p.K);
        blocks_group = g;
      }
      for (int64_t i = 0; i < num_ranges; ++i)
        RangeAllRows<Bits>(tile, p.block_bytes, ranges[i], i, rows, nullptr, nullptr, decoded);
    }
    const int64_t n0 = t * kTile, count = Min(kTile, p.N - n0);
    for (int64_t r = 0; r < p.M; ++r)
      for (int64_t i = 0; i < count; ++i)
        p.y[r * p.N + n0 + i] = rows.out[r * kTile + i] + (p.bias ? p.bias[n0 + i] : 0.0f);
  }
}

}  // namespace

bool GemmAvx512VnniSupports(const Problem& p) {
  return p.group_axis == 0 ? p.group_size % kQuad == 0 : p.groups == 1 || p.group_size % kTile == 0;
}

int64_t GemmAvx512VnniScratchBytes(const Problem& p) {
  return static_cast<int64_t>(p.M * (p.quads + 4) * kLimbs * sizeof(int32_t) +
                              (kBlockInputs + 16 + p.M * kTile) * sizeof(float) + kBlockInputs * kTile + 64 +
                              p.M * p.quads * sizeof(RowBlock) + p.quads * sizeof(Range));
}

void GemmAvx512Vnni(const Problem& p, const float* a, int64_t t0, int64_t t1, void* scratch) {
  WithBits(p.bits, [&](auto bits) { Gemm<decltype(bits)::value>(p, a, t0, t1, scratch); });
}

}  // namespace lowbit
