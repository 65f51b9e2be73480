// The CUDA kernel of lowbit::QuantMatMul behind a plain C++ interface (no CUDA or ORT headers), so that
// the ORT side (quant_matmul_cuda.cpp) is compiled by the host compiler.
#pragma once

#include <cstdint>

namespace lowbit {

// Device pointers; scales and zero points in the op's own layout ([groups, N] or [K, groups]).
struct CudaProblem {
  int64_t M, K, N;
  int bits, group_axis;
  int64_t group_size, groups;
  const uint8_t* packed;  // [tiles][quads][block_bytes]
  int64_t quads, block_bytes;
  const float* scales;         // float32 scales, or null when
  const uint16_t* scales_f16;  // the scales are float16 (their bits), else null
  const uint8_t* zero_points;  // or null: mid-point
  const int64_t* perm;         // or null
  const float* bias;           // or null
  const float* a;              // [M][K]
  float* y;                    // [M][N]
  // The sparse outliers (CSC over W's rows), or null pointers and outlier_count 0.
  const uint32_t* outlier_pointers;  // [N + 1]
  const uint16_t* outlier_rows;      // [outlier_count]
  const float* outlier_values;       // [outlier_count]
  int64_t outlier_count;
};

// Queues the computation on `stream` (a cudaStream_t); returns null, or the CUDA error message.
const char* LaunchQuantMatMulCuda(const CudaProblem& p, void* stream);

}  // namespace lowbit
