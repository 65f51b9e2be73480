// CUDA kernel of lowbit::QuantMatMul (fp32). Not tuned yet -- written and compiled on a machine without
// a GPU: one thread block per tile of 64 output channels and 8 rows; its 256 threads are 64 columns x 4
// input-channel lanes (j = k % 4, the quad position), each dequantizing its weights exactly as
// DequantizeLinear does and accumulating in fp32; the 4 lanes are summed through shared memory, and the
// column's sparse outliers (if any) are added by the lane that writes the output.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "codes.h"
#include "quant_matmul.h"
#include "quant_matmul_cuda.h"

namespace lowbit {
namespace {

constexpr int kRows = 8;
constexpr int64_t kMaxGridRows = 65535;

// Row m's products with output channel n's outliers (CSC); malformed indices give NaN (the CPU kernel raises).
__device__ float OutlierSum(const CudaProblem& p, int64_t n, int64_t m) {
  const uint32_t begin = p.outlier_pointers[n], end = p.outlier_pointers[n + 1];
  if (begin > end || end > p.outlier_count) return NAN;
  float sum = 0.0f;
  for (uint32_t e = begin; e < end; ++e) {
    const int64_t k = p.outlier_rows[e], source = p.perm ? p.perm[k < p.K ? k : 0] : k;
    if (k >= p.K || source < 0 || source >= p.K) return NAN;
    sum = fmaf(p.a[m * p.K + source], p.outlier_values[e], sum);
  }
  return sum;
}

template <int Bits>
__global__ void __launch_bounds__(kTile* kQuad) QuantMatMulKernel(CudaProblem p, int64_t row0) {
  const int c = threadIdx.x % kTile, j = threadIdx.x / kTile;
  const int64_t t = blockIdx.x, n = t * kTile + c, m0 = row0 + int64_t(blockIdx.y) * kRows;
  const int64_t rows = p.M - m0 < kRows ? p.M - m0 : kRows;
  const int64_t n_param = n < p.N ? n : p.N - 1;  // padding columns read valid parameters
  const uint8_t* tile = p.packed + t * p.quads * p.block_bytes;
  float acc[kRows] = {};
  for (int64_t q = 0; q < p.quads; ++q) {
    const int64_t k = q * kQuad + j;
    if (k >= p.K) break;  // uniform within a warp: a warp is 32 columns of one lane
    const int64_t param =
        p.group_axis == 0 ? (k / p.group_size) * p.N + n_param : k * p.groups + n_param / p.group_size;
    const int zero = p.zero_points ? p.zero_points[param] : 1 << (Bits - 1);
    const float scale = p.scales ? p.scales[param] : __half2float(__ushort_as_half(p.scales_f16[param]));
    const float w = float(CodeAt(tile + q * p.block_bytes, Bits, j, c) - zero) * scale;
    const int64_t source = p.perm ? p.perm[k] : k;
    const bool valid = source >= 0 && source < p.K;  // out-of-range permutation: NaN (the CPU kernel raises)
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      if (r < rows) acc[r] = valid ? fmaf(p.a[(m0 + r) * p.K + source], w, acc[r]) : NAN;
  }
  __shared__ float partial[kQuad][kRows][kTile];
#pragma unroll
  for (int r = 0; r < kRows; ++r) partial[j][r][c] = acc[r];
  __syncthreads();
  if (j == 0 && n < p.N)
    for (int r = 0; r < rows; ++r) {
      const float sum = ((partial[0][r][c] + partial[1][r][c]) + partial[2][r][c]) + partial[3][r][c];
      const float dense = p.bias ? sum + p.bias[n] : sum;
      p.y[(m0 + r) * p.N + n] = p.outlier_pointers ? dense + OutlierSum(p, n, m0 + r) : dense;
    }
}

template <int Bits>
void Launch(const CudaProblem& p, cudaStream_t stream) {
  const int64_t tiles = (p.N + kTile - 1) / kTile, row_blocks = (p.M + kRows - 1) / kRows;
  for (int64_t b0 = 0; b0 < row_blocks; b0 += kMaxGridRows) {
    const dim3 grid(static_cast<unsigned>(tiles),
                    static_cast<unsigned>(row_blocks - b0 < kMaxGridRows ? row_blocks - b0 : kMaxGridRows));
    QuantMatMulKernel<Bits><<<grid, kTile * kQuad, 0, stream>>>(p, b0 * kRows);
  }
}

}  // namespace

const char* LaunchQuantMatMulCuda(const CudaProblem& p, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  WithBits(p.bits, [&](auto bits) { Launch<decltype(bits)::value>(p, s); });
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

}  // namespace lowbit
