// The QuantMatMul kernels, written once for any instruction set and instantiated by isa_scalar.cpp,
// isa_avx2.cpp and isa_avx512.cpp, each compiled with its own -m flags. Everything here lives in an
// anonymous namespace: a function compiled for AVX-512 must never be merged by the linker into the code
// that runs on an AVX2-only machine.
//
// An Isa type provides: W (floats per vector), kNR (vectors per microkernel column block), F (the
// vector), Zero, Set1, Load, Store, Sub, Mul, FMAdd, Expand<Bits>(block, buffer) and Decode<Bits>(codes,
// j, v). Expand runs once per packed (tile, quad) block (kernels/packing.py) and returns what Decode reads
// for it: the block itself, or buffer (kExpandBytes) filled with a layout cheaper to decode (3-, 5- and 6-bit
// codes, whose high bits lie in a separate field, become one byte per code). Decode gives the floats 2^23 + q for
// the codes of columns v*W .. v*W + W - 1 and input channel j (0..3) of the block.
//
// The math (W[k, n] = (q - z) * s, groups along K for per-OC or along N for per-IC):
//   per-OC GEMV: y[n] = sum_j s[j, n] * sum_{k in group j} x[k] * (q[k, n] - z[j, n])
//   per-IC GEMV: y[n] = sum_k (x[k] * s[k, j]) * (q[k, n] - z[k, j]),  j = n / g
// so both inner loops are a float FMA of a broadcast activation with exact integer weights q - z
// (decoded as (2^23 + q) - (2^23 + z), no cancellation). The batched path dequantizes blocks of W to
// fp32 exactly as DequantizeLinear does and runs a register-tiled FMA loop over the rows.
#pragma once

#include "codes.h"
#include "prefetch.h"
#include "quant_matmul.h"

namespace lowbit {
namespace {

inline int64_t Min(int64_t a, int64_t b) { return a < b ? a : b; }

constexpr int kExpandBytes = kTile * kQuad;  // one byte per code of a block
// Widths whose codes straddle two fields (a 2- or 4-bit layout plus high bits): Expand gives them a byte each.
template <int Bits>
constexpr bool kExpanded = Bits == 3 || Bits == 5 || Bits == 6;

// Calls body(codes, j, k) for every input channel k in [k0, k1): codes is expand(block, buffer) of the
// packed quad holding k, and j = k % 4. Whole quads are unrolled so that j is a constant in the decoders.
template <class Expand, class Body>
inline void ForEachK(const uint8_t* blocks, int64_t block_bytes, int64_t k0, int64_t k1, Expand&& expand,
                     Body&& body) {
  alignas(64) uint8_t buffer[kExpandBytes];
  for (int64_t k = k0; k < k1;) {
    const uint8_t* block = blocks + (k >> 2) * block_bytes;
    PrefetchBlock(block, block_bytes);
    const uint8_t* codes = expand(block, buffer);
    if ((k & 3) == 0 && k + 4 <= k1) {
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) body(codes, j, k + j);
      k += 4;
    } else {
      body(codes, static_cast<int>(k & 3), k);
      ++k;
    }
  }
}

template <class Isa>
struct Kernels {
  using F = typename Isa::F;
  static constexpr int W = Isa::W;
  static constexpr int NV = kTile / W;  // vectors per tile row

  template <int Bits>
  static const uint8_t* Expand(const uint8_t* block, uint8_t* buffer) {
    return Isa::template Expand<Bits>(block, buffer);
  }

  // y[m, tile t] = vals (+ bias), cropped to N.
  static void WriteTile(const Problem& p, int64_t t, int64_t m, const float* vals) {
    const int64_t n0 = t * kTile, count = Min(kTile, p.N - n0);
    float* y = p.y + m * p.N + n0;
    if (p.bias) {
      for (int64_t i = 0; i < count; ++i) y[i] = vals[i] + p.bias[n0 + i];
    } else {
      for (int64_t i = 0; i < count; ++i) y[i] = vals[i];
    }
  }

  // Per-IC: the (transposed) scale and zero-point rows of the group of each vector of tile t.
  static void VectorGroups(const Problem& p, int64_t t, const float** scale, const float** zero) {
    for (int v = 0; v < NV; ++v) {
      const int64_t j = Min((t * kTile + v * W) / p.group_size, p.groups - 1);
      scale[v] = p.params.scale + j * p.K;
      zero[v] = p.params.zero + j * p.K;
    }
  }

  template <int Bits>
  static void GemvPerOc(const Problem& p, const float* x, int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* blocks = p.packed + t * p.quads * p.block_bytes;
      alignas(64) float out[kTile] = {};
      for (int64_t g = 0; g < p.groups; ++g) {
        const float* scale = p.params.scale + (t * p.groups + g) * kTile;
        const float* zero = p.params.zero + (t * p.groups + g) * kTile;
        F acc[NV];
        for (int v = 0; v < NV; ++v) acc[v] = Isa::Zero();
        const int64_t k0 = g * p.group_size;
        const int64_t k1 = Min(p.K, k0 + p.group_size);
        ForEachK(blocks, p.block_bytes, k0, k1, Expand<Bits>, [&](const uint8_t* block, int j, int64_t k) {
          const F xk = Isa::Set1(x[k]);
#pragma GCC unroll 64
          for (int v = 0; v < NV; ++v)
            acc[v] = Isa::FMAdd(xk, Isa::Sub(Isa::template Decode<Bits>(block, j, v), Isa::Load(zero + v * W)), acc[v]);
        });
        for (int v = 0; v < NV; ++v)
          Isa::Store(out + v * W, Isa::FMAdd(acc[v], Isa::Load(scale + v * W), Isa::Load(out + v * W)));
      }
      WriteTile(p, t, 0, out);
    }
  }

  // kOneGroup: the whole tile lies in one group (the common case: group_size a multiple of 64).
  template <int Bits, bool kOneGroup>
  static void GemvPerIc(const Problem& p, const float* x, int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* blocks = p.packed + t * p.quads * p.block_bytes;
      const float* scale[NV];
      const float* zero[NV];
      VectorGroups(p, t, scale, zero);
      F acc[NV];
      for (int v = 0; v < NV; ++v) acc[v] = Isa::Zero();
      ForEachK(blocks, p.block_bytes, 0, p.K, Expand<Bits>, [&](const uint8_t* block, int j, int64_t k) {
        if (kOneGroup) {
          const F xs = Isa::Set1(x[k] * scale[0][k]), z = Isa::Set1(zero[0][k]);
#pragma GCC unroll 64
          for (int v = 0; v < NV; ++v)
            acc[v] = Isa::FMAdd(xs, Isa::Sub(Isa::template Decode<Bits>(block, j, v), z), acc[v]);
        } else {
#pragma GCC unroll 64
          for (int v = 0; v < NV; ++v)
            acc[v] = Isa::FMAdd(Isa::Set1(x[k] * scale[v][k]),
                                Isa::Sub(Isa::template Decode<Bits>(block, j, v), Isa::Set1(zero[v][k])), acc[v]);
        }
      });
      alignas(64) float out[kTile];
      for (int v = 0; v < NV; ++v) Isa::Store(out + v * W, acc[v]);
      WriteTile(p, t, 0, out);
    }
  }

  template <int Bits>
  static void Gemv(const Problem& p, const float* x, int64_t t0, int64_t t1) {
    if (p.group_axis == 0)
      GemvPerOc<Bits>(p, x, t0, t1);
    else if (p.groups == 1 || p.group_size % kTile == 0)
      GemvPerIc<Bits, true>(p, x, t0, t1);
    else
      GemvPerIc<Bits, false>(p, x, t0, t1);
  }

  // w[k - k0][0..63] = dequantized W[k, tile t] for k in [k0, k0 + kc).
  template <int Bits>
  static void DequantBlock(const Problem& p, int64_t t, int64_t k0, int64_t kc, float* w) {
    const uint8_t* blocks = p.packed + t * p.quads * p.block_bytes;
    if (p.group_axis == 0) {
      for (int64_t k = k0, k_end = k0 + kc; k < k_end;) {
        const int64_t g = k / p.group_size, k1 = Min(k_end, (g + 1) * p.group_size);
        const float* scale = p.params.scale + (t * p.groups + g) * kTile;
        const float* zero = p.params.zero + (t * p.groups + g) * kTile;
        ForEachK(blocks, p.block_bytes, k, k1, Expand<Bits>, [&](const uint8_t* block, int j, int64_t kk) {
          float* out = w + (kk - k0) * kTile;
#pragma GCC unroll 64
          for (int v = 0; v < NV; ++v)
            Isa::Store(out + v * W, Isa::Mul(Isa::Sub(Isa::template Decode<Bits>(block, j, v), Isa::Load(zero + v * W)),
                                             Isa::Load(scale + v * W)));
        });
        k = k1;
      }
    } else if (p.groups == 1 || p.group_size % W == 0) {
      const float* scale[NV];
      const float* zero[NV];
      VectorGroups(p, t, scale, zero);
      ForEachK(blocks, p.block_bytes, k0, k0 + kc, Expand<Bits>, [&](const uint8_t* block, int j, int64_t k) {
        float* out = w + (k - k0) * kTile;
#pragma GCC unroll 64
        for (int v = 0; v < NV; ++v)
          Isa::Store(out + v * W, Isa::Mul(Isa::Sub(Isa::template Decode<Bits>(block, j, v), Isa::Set1(zero[v][k])),
                                           Isa::Set1(scale[v][k])));
      });
    } else {  // per-IC groups that split vectors: element by element
      auto packed = [](const uint8_t* block, uint8_t*) { return block; };  // CodeAt reads the packed layout
      ForEachK(blocks, p.block_bytes, k0, k0 + kc, packed, [&](const uint8_t* block, int j, int64_t k) {
        for (int c = 0; c < kTile; ++c) {
          const int64_t g = Min((t * kTile + c) / p.group_size, p.groups - 1);
          const float q = kMagic + static_cast<float>(CodeAt(block, Bits, j, c));
          w[(k - k0) * kTile + c] = (q - p.params.zero[g * p.K + k]) * p.params.scale[g * p.K + k];
        }
      });
    }
  }

  // c[MR][kNR vectors] (row stride kTile) += a[MR][kc] (row stride lda) * w[kc][kNR vectors] (stride kTile).
  template <int MR>
  static void Micro(const float* a, int64_t lda, const float* w, int64_t kc, float* c) {
    F acc[MR][Isa::kNR];
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < Isa::kNR; ++r) acc[m][r] = Isa::Load(c + m * kTile + r * W);
    for (int64_t k = 0; k < kc; ++k) {
      F b[Isa::kNR];
      for (int r = 0; r < Isa::kNR; ++r) b[r] = Isa::Load(w + k * kTile + r * W);
      for (int m = 0; m < MR; ++m) {
        const F am = Isa::Set1(a[m * lda + k]);
        for (int r = 0; r < Isa::kNR; ++r) acc[m][r] = Isa::FMAdd(am, b[r], acc[m][r]);
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < Isa::kNR; ++r) Isa::Store(c + m * kTile + r * W, acc[m][r]);
  }

  static constexpr void (*kMicro[kMaxRows])(const float*, int64_t, const float*, int64_t, float*) = {
      &Micro<1>, &Micro<2>, &Micro<3>, &Micro<4>, &Micro<5>, &Micro<6>};

  template <int Bits>
  static void Gemm(const Problem& p, const float* a, int64_t t0, int64_t t1, float* scratch) {
    float* w = scratch;                    // [kKBlock][kTile]
    float* c = scratch + kKBlock * kTile;  // [M][kTile]
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t i = 0; i < p.M * kTile; ++i) c[i] = 0.0f;
      for (int64_t k0 = 0; k0 < p.K; k0 += kKBlock) {
        const int64_t kc = Min(kKBlock, p.K - k0);
        DequantBlock<Bits>(p, t, k0, kc, w);
        const int64_t row_blocks = (p.M + kMaxRows - 1) / kMaxRows;  // of near-equal sizes: 8 rows = 4 + 4
        for (int64_t b = 0, m0 = 0; b < row_blocks; ++b) {
          const int64_t rows = (p.M - m0 + row_blocks - b - 1) / (row_blocks - b);
          for (int v = 0; v < NV; v += Isa::kNR)
            kMicro[rows - 1](a + m0 * p.K + k0, p.K, w + v * W, kc, c + m0 * kTile + v * W);
          m0 += rows;
        }
      }
      for (int64_t m = 0; m < p.M; ++m) WriteTile(p, t, m, c + m * kTile);
    }
  }

  static void GemvAnyBits(const Problem& p, const float* x, int64_t t0, int64_t t1) {
    WithBits(p.bits, [&](auto bits) { Gemv<decltype(bits)::value>(p, x, t0, t1); });
  }

  static void GemmAnyBits(const Problem& p, const float* a, int64_t t0, int64_t t1, float* scratch) {
    WithBits(p.bits, [&](auto bits) { Gemm<decltype(bits)::value>(p, a, t0, t1, scratch); });
  }
};

template <class Isa>
IsaKernels MakeKernels(const char* name) {
  return IsaKernels{name, Isa::W, &Kernels<Isa>::GemvAnyBits, &Kernels<Isa>::GemmAnyBits};
}

}  // namespace
}  // namespace lowbit
