// Plain data shared by the op (quant_matmul.cpp) and the per-ISA kernels (isa_*.cpp).
// No standard-library code here: the ISA files are compiled with different -m flags and must not share
// out-of-line functions with each other (see kernels_impl.h).
#pragma once

#include <cstddef>
#include <cstdint>

namespace lowbit {

constexpr int kTile = 64;             // output channels per packed tile (kernels/packing.py)
constexpr int kQuad = 4;              // input channels per packed quad
constexpr int64_t kKBlock = 128;      // input channels dequantized at once by the batched path
constexpr int kMaxRows = 6;           // rows of A per microkernel call (batched path)
constexpr float kMagic = 8388608.0f;  // 2^23: the float with bits 0x4B000000 | q is 2^23 + q

// Scales and zero points rearranged for the kernels (PreparedParams in quant_matmul.cpp). Zero points
// are stored as 2^23 + z, so that (2^23 + q) - zero == q - z exactly in float arithmetic.
//   per-OC (group_axis 0): [tiles][groups][64] each, zero-padded past N;
//   per-IC (group_axis 1): [groups][K] each (the transpose of the ONNX layout).
struct GroupParams {
  const float* scale;
  const float* zero;
};

struct Problem {
  int64_t M, K, N;
  int bits;
  int group_axis;
  int64_t group_size, groups;
  const uint8_t* packed;  // [tiles][quads][block_bytes]
  int64_t quads, block_bytes;
  GroupParams params;
  const float* bias;  // [N] or null
  float* y;           // [M][N]
};

// The kernels of one instruction set. Each computes the output columns of tiles [tile_begin, tile_end).
struct IsaKernels {
  const char* name;
  int lanes;  // floats per vector
  // One row x[K]. Needs every |x[k]| < 2^100 (finite), and per-IC groups that are whole vectors
  // (group_size % lanes == 0) or a single group.
  void (*gemv)(const Problem& p, const float* x, int64_t tile_begin, int64_t tile_end);
  // Rows a[M][K], any values: dequantizes kKBlock x 64 blocks to fp32, then a register-tiled FMA loop.
  // scratch: (kKBlock + M) * kTile floats.
  void (*gemm)(const Problem& p, const float* a, int64_t tile_begin, int64_t tile_end, float* scratch);
};

extern const IsaKernels kScalarKernels;
extern const IsaKernels kAvx2Kernels;
extern const IsaKernels kAvx512Kernels;

// Integer path for a few rows on AVX-512 VNNI (isa_avx512_vnni.cpp), used where it supports the grouping:
// per-OC groups of whole quads, per-IC tiles inside one group. Rows a[M][K] need |a| < 2^100 like
// IsaKernels::gemv; the rows' activations are prepared once per call of this function (per task).
bool GemmAvx512VnniSupports(const Problem& p);
int64_t GemmAvx512VnniScratchBytes(const Problem& p);
void GemmAvx512Vnni(const Problem& p, const float* a, int64_t tile_begin, int64_t tile_end, void* scratch);

}  // namespace lowbit
