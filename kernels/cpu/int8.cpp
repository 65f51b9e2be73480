// The int8-activation path of QuantMatMul (int8.h): activation blocks, per-OC and per-IC groups, tiles and
// the epilogue; the integer work is done by the instruction set's primitives.
#include "int8.h"

namespace lowbit {
namespace {

int64_t Min(int64_t a, int64_t b) { return a < b ? a : b; }

int64_t AlignUp(int64_t bytes) { return (bytes + 63) & ~int64_t{63}; }

}  // namespace

Int8Plan::Int8Plan(const Problem& p, const Int8Kernels& kernels, const uint8_t* zero_bytes)
    : p_(p), kernels_(kernels), zero_bytes_(zero_bytes) {
  const int64_t span = p.group_axis == 0 ? p.group_size : p.K;  // per-OC, blocks never straddle a group
  int64_t word = 0, group = 0;
  for (int64_t g0 = 0; g0 < p.K; g0 += span, ++group)
    for (int64_t k0 = g0, end = Min(p.K, g0 + span); k0 < end; k0 += kActivationBlock) {
      const int64_t k1 = Min(end, k0 + kActivationBlock), q0 = k0 / kQuad, q1 = (k1 + kQuad - 1) / kQuad;
      blocks_.push_back(Int8Block{k0, k1, q0, q1, word, p.group_axis == 0 ? group : 0});
      word += q1 - q0;
    }
  words_ = word;
}

int64_t Int8Plan::RowsBytes() const {
  const int64_t blocks = static_cast<int64_t>(blocks_.size());
  return AlignUp(p_.M * words_ * 4) + AlignUp(p_.M * blocks * 4) * 2;
}

bool Int8Plan::StreamsTiles() const {
  return p_.M == 1 && kernels_.tiles && p_.quads * p_.block_bytes >= kInt8StreamTileBytes &&
         (p_.group_axis == 0 || p_.groups == 1 || p_.group_size % kTile == 0);
}

int64_t Int8Plan::ScratchBytes() const {
  if (StreamsTiles()) {  // out per tile; per-IC a quantized group per tile
    const int64_t per_ic = p_.group_axis == 1 ? kInt8MaxTiles * RowsBytes() : 0;
    return AlignUp(kInt8MaxTiles * kTile * 4) + per_ic + 64;
  }
  // out and the per-IC group's out [M][64], decoded codes; per-IC two quantized groups
  const int64_t per_ic = p_.group_axis == 1 ? 2 * RowsBytes() : 0;
  return 2 * AlignUp(p_.M * kTile * 4) + AlignUp(kDecodedBytes) + per_ic + 64;
}

Int8Rows Int8Plan::Quantize(const float* a, const float* scale, const uint8_t* zero, void* rows_memory) const {
  const int64_t blocks = static_cast<int64_t>(blocks_.size());
  uint8_t* memory = static_cast<uint8_t*>(rows_memory);
  Int8Rows rows{reinterpret_cast<int32_t*>(memory), nullptr, nullptr};
  rows.scale = reinterpret_cast<float*>(memory + AlignUp(p_.M * words_ * 4));
  rows.corr = reinterpret_cast<int32_t*>(memory + AlignUp(p_.M * words_ * 4) + AlignUp(p_.M * blocks * 4));
  for (int64_t r = 0; r < p_.M; ++r) {
    if (kernels_.quantize_blocks) {
      kernels_.quantize_blocks(a + r * p_.K, scale, zero, blocks_.data(), blocks, rows.words + r * words_,
                               rows.scale + r * blocks, rows.corr + r * blocks);
      continue;
    }
    for (int64_t i = 0; i < blocks; ++i) {
      const Int8Block& b = blocks_[i];
      int32_t* words = rows.words + r * words_ + b.word;
      int32_t* corr = rows.corr + r * blocks + i;
      rows.scale[r * blocks + i] = kernels_.quantize(a + r * p_.K, scale, zero, b, words, corr);
    }
  }
  return rows;
}

// out[M][64] += the products of every block of tile t (per-OC: with the column scales and zero points)
void Int8Plan::AddBlocks(const Int8Rows& rows, int64_t t, uint8_t* decoded, float* out) const {
  const int64_t blocks = static_cast<int64_t>(blocks_.size());
  const uint8_t* tile = p_.packed + t * p_.quads * p_.block_bytes;
  for (int64_t i = 0; i < blocks; ++i) {
    const Int8Block& b = blocks_[i];
    Int8Tile job{tile + b.q0 * p_.block_bytes,
                 p_.block_bytes,
                 b.q1 - b.q0,
                 p_.bits,
                 p_.M,
                 rows.words + b.word,
                 words_,
                 rows.scale + i,
                 rows.corr + i,
                 blocks,
                 nullptr,
                 nullptr,
                 decoded,
                 out};
    if (p_.group_axis == 0) {
      const int64_t offset = Int8PerOcOffset(t, b.group, p_.groups);
      job.col_scale = p_.params.scale + offset;
      job.col_zero = zero_bytes_ + offset;
    }
    kernels_.tile(job);
  }
}

void Int8Plan::RunTiles(const float* a, const Int8Rows* shared, int64_t t0, int64_t t1, uint8_t* memory) const {
  const int64_t blocks = static_cast<int64_t>(blocks_.size()), tile_bytes = p_.quads * p_.block_bytes;
  float* out = reinterpret_cast<float*>(memory);  // [kInt8MaxTiles][64]
  uint8_t* slots = memory + AlignUp(kInt8MaxTiles * kTile * 4);
  Int8Rows slot_rows[kInt8MaxTiles];
  int64_t slot_group[kInt8MaxTiles] = {-1, -1, -1, -1};  // per-IC: the group quantized in each slot
  const Int8Rows* rows[kInt8MaxTiles];

  for (int64_t t = t0; t < t1; t += kInt8MaxTiles) {
    const int count = static_cast<int>(Min(kInt8MaxTiles, t1 - t));
    for (int64_t i = 0; i < count * kTile; ++i) out[i] = 0.0f;
    for (int s = 0; s < count; ++s) {
      rows[s] = shared;
      if (p_.group_axis == 1) {  // the tile's output group (tiles of consecutive groups: distinct slots)
        const int64_t j = (t + s) * kTile / p_.group_size;
        const int slot = static_cast<int>(j % kInt8MaxTiles);
        if (slot_group[slot] != j) {
          const uint8_t* zero = zero_bytes_ + j * (p_.quads * kQuad + kZeroBytesPad);
          slot_rows[slot] = Quantize(a, p_.params.scale + j * p_.K, zero, slots + slot * RowsBytes());
          slot_group[slot] = j;
        }
        rows[s] = &slot_rows[slot];
      }
    }
    Int8Tiles job{};
    job.count = count;
    job.bits = p_.bits;
    job.block_bytes = p_.block_bytes;
    for (int64_t i = 0; i < blocks; ++i) {
      const Int8Block& b = blocks_[i];
      job.quads = b.q1 - b.q0;
      for (int s = 0; s < count; ++s) {
        job.codes[s] = p_.packed + (t + s) * tile_bytes + b.q0 * p_.block_bytes;
        job.words[s] = rows[s]->words + b.word;
        job.act_scale[s] = rows[s]->scale[i];
        job.corr[s] = rows[s]->corr[i];
        job.out[s] = out + s * kTile;
        job.col_scale[s] = nullptr;
        job.col_zero[s] = nullptr;
        if (p_.group_axis == 0) {
          const int64_t offset = Int8PerOcOffset(t + s, b.group, p_.groups);
          job.col_scale[s] = p_.params.scale + offset;
          job.col_zero[s] = zero_bytes_ + offset;
        }
      }
      kernels_.tiles(job);
    }
    for (int s = 0; s < count; ++s) {
      const int64_t n0 = (t + s) * kTile, columns = Min(kTile, p_.N - n0);
      for (int64_t c = 0; c < columns; ++c) p_.y[n0 + c] = out[s * kTile + c] + (p_.bias ? p_.bias[n0 + c] : 0.0f);
    }
  }
}

void Int8Plan::Run(const float* a, const Int8Rows* shared, int64_t t0, int64_t t1, void* scratch) const {
  uint8_t* memory = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(scratch) + 63) & ~uintptr_t{63});
  if (StreamsTiles()) return RunTiles(a, shared, t0, t1, memory);
  const int64_t out_bytes = AlignUp(p_.M * kTile * 4);
  float* out = reinterpret_cast<float*>(memory);
  float* group_out = reinterpret_cast<float*>(memory + out_bytes);
  uint8_t* decoded = memory + 2 * out_bytes;
  uint8_t* slots = decoded + AlignUp(kDecodedBytes);
  Int8Rows slot_rows[2];
  int64_t slot_group[2] = {-1, -1};  // per-IC: the groups quantized in the two slots

  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n0 = t * kTile, count = Min(kTile, p_.N - n0);
    for (int64_t i = 0; i < p_.M * kTile; ++i) out[i] = 0.0f;
    if (p_.group_axis == 0) {
      AddBlocks(*shared, t, decoded, out);
    } else {  // each output group of the tile with its own activations x * s[:, j]
      const int64_t j0 = n0 / p_.group_size, j1 = (n0 + count - 1) / p_.group_size;
      for (int64_t j = j0; j <= j1; ++j) {
        const int slot = static_cast<int>(j & 1);
        if (slot_group[slot] != j) {
          const uint8_t* zero = zero_bytes_ + j * (p_.quads * kQuad + kZeroBytesPad);
          slot_rows[slot] = Quantize(a, p_.params.scale + j * p_.K, zero, slots + slot * RowsBytes());
          slot_group[slot] = j;
        }
        if (j0 == j1) {
          AddBlocks(slot_rows[slot], t, decoded, out);
          continue;
        }
        // a tile split between groups: the whole tile with this group's activations, its columns kept
        for (int64_t i = 0; i < p_.M * kTile; ++i) group_out[i] = 0.0f;
        AddBlocks(slot_rows[slot], t, decoded, group_out);
        const int64_t c0 = j * p_.group_size - n0 > 0 ? j * p_.group_size - n0 : 0;
        const int64_t c1 = Min(count, (j + 1) * p_.group_size - n0);
        for (int64_t r = 0; r < p_.M; ++r)
          for (int64_t c = c0; c < c1; ++c) out[r * kTile + c] = group_out[r * kTile + c];
      }
    }
    for (int64_t r = 0; r < p_.M; ++r)
      for (int64_t c = 0; c < count; ++c)
        p_.y[r * p_.N + n0 + c] = out[r * kTile + c] + (p_.bias ? p_.bias[n0 + c] : 0.0f);
  }
}

}  // namespace lowbit
