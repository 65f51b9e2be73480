// Software prefetch of the packed codes, for the CPU kernels (kernels_impl.h, isa_avx512_vnni.cpp); host
// code only, apart from quant_matmul.h, which the CUDA kernel includes too.
#pragma once

#include <cstdint>

namespace lowbit {
namespace {

// Bytes ahead of the packed block being read that the kernels prefetch: a weight read once per call comes
// from main memory, and the hardware prefetcher alone leaves a single thread waiting on it.
constexpr int64_t kPrefetchBytes = 2048;

// Prefetches the lines kPrefetchBytes ahead of a packed block (two: blocks of 96 bytes straddle lines).
// In an anonymous namespace: each translation unit keeps its own copy (see kernels_impl.h).
inline void PrefetchBlock(const uint8_t* block, int64_t block_bytes) {
  __builtin_prefetch(block + kPrefetchBytes);
  __builtin_prefetch(block + kPrefetchBytes + block_bytes - 1);
}

}  // namespace
}  // namespace lowbit
