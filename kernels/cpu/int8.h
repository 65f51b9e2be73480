// QuantMatMul with int8 activations (attribute int8_activations = 1; specified in kernels/reference.py):
// the plan and driver (int8.cpp, portable) and the two primitives each instruction set provides
// (int8_scalar.cpp, int8_avx2.cpp, int8_avx512_vnni.cpp). Plain data only in the interface: the ISA files
// are compiled with different -m flags (see kernels_impl.h).
#pragma once

#include <cstdint>
#include <vector>

#include "codes.h"
#include "quant_matmul.h"

namespace lowbit {

constexpr int64_t kActivationBlock = 128;  // input channels per activation block (reference.ACTIVATION_BLOCK)
constexpr int kInt8Limit = 127;            // |X| <= 127 (reference.INT8_LIMIT)
// One activation block: input channels [k0, k1), quads [q0, q1). Its codes are the words (4 codes, one quad)
// [word, word + q1 - q0) of a row; quads partly outside [k0, k1) hold zeros there (a per-OC group may
// start inside a quad: that quad is then in two blocks).
struct Int8Block {
  int64_t k0, k1, q0, q1, word, group;  // group: the per-OC weight group holding it (0 per-IC)
};

// Quantizes xs[k] = x[k] * (scale ? scale[k] : 1), k in [b.k0, b.k1), to int8 as kernels/reference.py does.
// words[i], i < b.q1 - b.q0, holds the codes of quad b.q0 + i (byte j: input channel 4 (b.q0 + i) + j; zero
// outside the block); nothing else is written. *corr = sum_k X[k] * (zero ? zero[k] : 1), zero: the zero points
// as bytes, [4 * quads]. Returns the block's scale: NaN if an xs is not finite (the codes are then 0).
using Int8QuantizeFn = float (*)(const float* x, const float* scale, const uint8_t* zero, const Int8Block& b,
                                 int32_t* words, int32_t* corr);
// Int8QuantizeFn for `count` blocks of one row: block i's codes at words + blocks[i].word, its scale in
// act[i] and its correction in corr[i]; the same results, several blocks in flight at once.
using Int8QuantizeBlocksFn = void (*)(const float* x, const float* scale, const uint8_t* zero,
                                      const Int8Block* blocks, int64_t count, int32_t* words, float* act,
                                      int32_t* corr);

// One block of one tile for `rows` rows:
//   out[r][c] += act_scale[r] * col_scale[c] * (sum_q dot4(codes of quad q, column c; words of row r, quad q)
//                                                - col_zero[c] * corr[r])
// with col_scale = 1 and col_zero = 1 where null (per-IC: corr then holds the zero points already). Every sum
// and product of integers here is below 2^24 in magnitude (reference.py), so the kernels may take them in float.
struct Int8Tile {
  const uint8_t* codes;  // the packed block of quad q0 in this tile
  int64_t block_bytes, quads;
  int bits;
  int64_t rows;
  const int32_t* words;  // row r: words + r * word_stride, `quads` words
  int64_t word_stride;
  const float* act_scale;  // row r: act_scale[r * param_stride]
  const int32_t* corr;     // row r: corr[r * param_stride]
  int64_t param_stride;
  const float* col_scale;   // [64] or null
  const uint8_t* col_zero;  // [64] or null: the zero points as bytes (zero_bytes)
  uint8_t* decoded;         // scratch of kDecodedBytes: the codes as bytes, shared by the rows
  float* out;               // [rows][64]
};
constexpr int64_t kDecodedBytes = (kActivationBlock / kQuad + 1) * kQuad * kTile;
using Int8TileFn = void (*)(const Int8Tile& t);

// One row (M = 1) reads every code once: the kernels then stream several tiles at once, each from its own
// pages, instead of one after another (one stream of a single thread draws less from memory than several).
constexpr int kInt8MaxTiles = 4;
// ... where a tile is long enough: short tiles (few input channels) one after another are one long stream
// already, and several of them at once restart every stream after a few pages.
constexpr int64_t kInt8StreamTileBytes = 32 * 1024;

// One block of `count` (1 .. kInt8MaxTiles) tiles for one row: for each tile s,
//   out[s][c] += act_scale[s] * col_scale[s][c] * (sum_q dot4(codes[s] of quad q, column c; words[s][q])
//                                                   - col_zero[s][c] * corr[s])
// the arithmetic of Int8Tile with rows = 1 (col_scale and col_zero: all null or none, as there).
struct Int8Tiles {
  int count, bits;
  int64_t block_bytes, quads;
  const uint8_t* codes[kInt8MaxTiles];  // the packed block of quad q0 of each tile
  const int32_t* words[kInt8MaxTiles];  // the row's words of the block, per tile (per-IC: its group's)
  float act_scale[kInt8MaxTiles];
  int32_t corr[kInt8MaxTiles];
  const float* col_scale[kInt8MaxTiles];   // [64] each, or null
  const uint8_t* col_zero[kInt8MaxTiles];  // [64] bytes each, or null
  float* out[kInt8MaxTiles];               // [64] each
};
using Int8TilesFn = void (*)(const Int8Tiles& t);

struct Int8Kernels {
  const char* name;
  Int8QuantizeFn quantize;
  Int8TileFn tile;
  Int8TilesFn tiles;  // or null: one row goes through `tile`, one tile at a time
  Int8QuantizeBlocksFn quantize_blocks;  // or null: `quantize`, one block at a time
};

extern const Int8Kernels kInt8ScalarKernels;
extern const Int8Kernels kInt8Avx2Kernels;
extern const Int8Kernels kInt8Avx512VnniKernels;

// The rows' int8 activations for one factor (per-OC: x; per-IC: x * s[:, j] for output group j).
struct Int8Rows {
  int32_t* words;  // [rows][words of all blocks]
  float* scale;    // [rows][blocks]
  int32_t* corr;   // [rows][blocks]
};

// Zero points as bytes, prepared with the scales (quant_matmul.cpp). Per-OC, scales and zero points alike are
// [tiles / kInt8MaxTiles][groups][kInt8MaxTiles][64] (Int8PerOcOffset): the tiles that the one-row kernels
// stream at once keep their parameters side by side, one stream of memory instead of two per tile (with more
// streams in flight a single thread drew less from memory). Per-IC, as the quantizers read them: one row of
// bytes per output group, z[k] at k, zeros past K and room for a whole vector read from the last quad.
constexpr int64_t kZeroBytesPad = 64;

// Per-OC: where the 64 parameters of tile t and group g start, and how many the layout holds.
inline int64_t Int8PerOcOffset(int64_t t, int64_t g, int64_t groups) {
  return (((t / kInt8MaxTiles) * groups + g) * kInt8MaxTiles + t % kInt8MaxTiles) * kTile;
}
inline int64_t Int8PerOcSize(int64_t tiles, int64_t groups) {
  return (tiles + kInt8MaxTiles - 1) / kInt8MaxTiles * groups * kInt8MaxTiles * kTile;
}

// A call's blocks and the driver. Per-OC, the activations are quantized once per call (Quantize, before the
// threads); per-IC, once per output group by each task that needs it (Run's scratch).
class Int8Plan {
 public:
  // zero_bytes: per-OC as Int8PerOcOffset, per-IC [groups][4 * quads + kZeroBytesPad] (see kZeroBytesPad)
  Int8Plan(const Problem& p, const Int8Kernels& kernels, const uint8_t* zero_bytes);
  int64_t RowsBytes() const;     // of one Int8Rows for all rows
  int64_t ScratchBytes() const;  // of Run
  // rows_memory: RowsBytes() bytes; scale/zero: one per-IC group's (a GroupParams row and a zero_bytes row),
  // or null (per-OC)
  Int8Rows Quantize(const float* a, const float* scale, const uint8_t* zero, void* rows_memory) const;
  // y for tiles [t0, t1); shared: the per-OC activations (Quantize), null per-IC
  void Run(const float* a, const Int8Rows* shared, int64_t t0, int64_t t1, void* scratch) const;

 private:
  void AddBlocks(const Int8Rows& rows, int64_t t, uint8_t* decoded, float* out) const;
  // Run for one row with the kernels' `tiles`: kInt8MaxTiles tiles at a time (per-IC: each tile in one group)
  bool StreamsTiles() const;
  void RunTiles(const float* a, const Int8Rows* shared, int64_t t0, int64_t t1, uint8_t* memory) const;
  Problem p_;
  const Int8Kernels& kernels_;
  std::vector<Int8Block> blocks_;
  int64_t words_;  // per row
  const uint8_t* zero_bytes_;
};

}  // namespace lowbit
