// The code layouts of kernels/packing.py, element by element, for host and device code.
#pragma once

#include <cstdint>
#include <type_traits>

#ifdef __CUDACC__
#define LOWBIT_HOST_DEVICE __host__ __device__
#else
#define LOWBIT_HOST_DEVICE
#endif

namespace lowbit {

// u[i] of the 4-bit layout, of the 2-bit layout, and bit i of a 256-bit plane (kernels/packing.py).
LOWBIT_HOST_DEVICE static inline int Nibble(const uint8_t* block, int i) {
  return i < 128 ? block[i] & 15 : block[i - 128] >> 4;
}
LOWBIT_HOST_DEVICE static inline int TwoBit(const uint8_t* block, int i) {
  return (block[i & 63] >> (2 * (i >> 6))) & 3;
}
LOWBIT_HOST_DEVICE static inline int PlaneBit(const uint8_t* plane, int i) { return (plane[i >> 3] >> (i & 7)) & 1; }

// The code of column c (0..63) and input channel j (0..3) of a packed (tile, quad) block. static: each
// translation unit, compiled for its own instruction set, keeps its own copy.
LOWBIT_HOST_DEVICE static inline int CodeAt(const uint8_t* block, int bits, int j, int c) {
  const int i = 4 * c + j;  // u[i]
  switch (bits) {
    case 8: return block[i];
    case 4: return Nibble(block, i);
    case 2: return TwoBit(block, i);
    case 3: return TwoBit(block, i) | (PlaneBit(block + 64, i) << 2);
    case 5: return Nibble(block, i) | (PlaneBit(block + 128, i) << 4);
    default: return Nibble(block, i) | (TwoBit(block + 128, i) << 4);  // 6
  }
}

// f(std::integral_constant<int, bits>()) for a packed code width (2, 3, 4, 5, 6 or 8): the one switch from
// a run-time width to the kernels' compile-time Bits.
template <class F>
inline decltype(auto) WithBits(int bits, F&& f) {
  switch (bits) {
    case 2: return f(std::integral_constant<int, 2>());
    case 3: return f(std::integral_constant<int, 3>());
    case 4: return f(std::integral_constant<int, 4>());
    case 5: return f(std::integral_constant<int, 5>());
    case 6: return f(std::integral_constant<int, 6>());
    default: return f(std::integral_constant<int, 8>());
  }
}

}  // namespace lowbit
