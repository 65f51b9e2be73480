// Portable int8-activation primitives (int8.h), for CPUs without AVX2: one code at a time.
#include <cmath>

#include "codes.h"
#include "int8.h"

namespace lowbit {
namespace {

float ScaledInput(const float* x, const float* scale, int64_t k) { return scale ? x[k] * scale[k] : x[k]; }

float Quantize(const float* x, const float* scale, const uint8_t* zero, const Int8Block& b, int32_t* words,
               int32_t* corr) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t k = b.k0; k < b.k1; ++k) {
    const float xs = ScaledInput(x, scale, k);
    finite &= std::isfinite(xs);
    amax = std::fmax(amax, std::fabs(xs));
  }
  const float act = amax / static_cast<float>(kInt8Limit), inverse = 1.0f / act;
  const bool usable = finite && act > 0.0f && std::isfinite(inverse);
  int32_t sum = 0;
  for (int64_t q = b.q0; q < b.q1; ++q) {
    uint32_t word = 0;
    for (int j = 0; j < kQuad; ++j) {
      const int64_t k = q * kQuad + j;
      if (!usable || k < b.k0 || k >= b.k1) continue;
      const int32_t code = static_cast<int32_t>(std::nearbyint(ScaledInput(x, scale, k) * inverse));
      word |= static_cast<uint32_t>(code & 0xFF) << (8 * j);
      sum += code * (zero ? zero[k] : 1);
    }
    words[q - b.q0] = static_cast<int32_t>(word);
  }
  *corr = sum;
  return finite ? act : NAN;
}

void Tile(const Int8Tile& t) {
  for (int64_t r = 0; r < t.rows; ++r) {
    const int32_t* words = t.words + r * t.word_stride;
    const float act = t.act_scale[r * t.param_stride];
    const float corr = static_cast<float>(t.corr[r * t.param_stride]);
    for (int c = 0; c < kTile; ++c) {
      int32_t dot = 0;
      for (int64_t q = 0; q < t.quads; ++q)
        for (int j = 0; j < kQuad; ++j)
          dot += CodeAt(t.codes + q * t.block_bytes, t.bits, j, c) * static_cast<int8_t>(words[q] >> (8 * j));
      const float zero = t.col_zero ? static_cast<float>(t.col_zero[c]) : 1.0f;
      const float sum = static_cast<float>(dot) - zero * corr;  // exact (int8.h)
      t.out[r * kTile + c] += (t.col_scale ? act * t.col_scale[c] : act) * sum;
    }
  }
}

}  // namespace

const Int8Kernels kInt8ScalarKernels{"scalar", &Quantize, &Tile, nullptr};

}  // namespace lowbit
