// The code layouts of kernels/packing.py, element by element, for host and device code.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define LOWBIT_HOST_DEVICE __host__ __device__
#else
#define LOWBIT_HOST_DEVICE
#endif

namespace lowbit {

// The code of column c (0..63) and input channel j (0..3) of a packed (tile, quad) block. static: each
// translation unit, compiled for its own instruction set, keeps its own copy.
LOWBIT_HOST_DEVICE static inline int CodeAt(const uint8_t* block, int bits, int j, int c) {
  const int i = 4 * c + j;  // u[i]
  const int two_bit = (block[i & 63] >> (2 * (i >> 6))) & 3;
  switch (bits) {
    case 8: return block[i];
    case 4: return i < 128 ? block[i] & 15 : block[i - 128] >> 4;
    case 2: return two_bit;
    default: return two_bit | (((block[64 + (i >> 3)] >> (i & 7)) & 1) << 2);
  }
}

}  // namespace lowbit
