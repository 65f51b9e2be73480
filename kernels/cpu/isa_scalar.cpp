// Portable kernels (no SIMD intrinsics; the compiler may still vectorise for the baseline x86-64 ISA).
#include "kernels_impl.h"
#include "quant_matmul.h"

namespace lowbit {
namespace {

struct Scalar {
  static constexpr int W = 1, kNR = 4;
  using F = float;
  static F Zero() { return 0.0f; }
  static F Set1(float x) { return x; }
  static F Load(const float* p) { return *p; }
  static void Store(float* p, F x) { *p = x; }
  static F Sub(F a, F b) { return a - b; }
  static F Mul(F a, F b) { return a * b; }
  static F FMAdd(F a, F b, F c) { return a * b + c; }
  template <int Bits>
  static const uint8_t* Expand(const uint8_t* block, uint8_t*) {
    return block;
  }
  template <int Bits>
  static F Decode(const uint8_t* block, int j, int v) {
    return kMagic + static_cast<float>(CodeAt(block, Bits, j, v));
  }
};

}  // namespace

const IsaKernels kScalarKernels = MakeKernels<Scalar>("scalar");

}  // namespace lowbit
