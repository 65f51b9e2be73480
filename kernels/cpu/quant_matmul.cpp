// lowbit::QuantMatMul on ONNX Runtime's CPU execution provider: input validation, preparation of the
// group parameters, the choice of kernels (instruction set; GEMV, integer or batched path; the int8-activation
// path of int8.h when the attribute asks for it) and threading through ORT's ParallelFor. The op is specified
// in kernels/reference.py; the math lives in kernels_impl.h, isa_avx512_vnni.cpp and int8*.cpp.
#include "quant_matmul.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "int8.h"
#include "quant_matmul_op.h"

namespace lowbit {
namespace {

// Work (weight bytes x rows) below which threads cost more than they save (a few microseconds).
constexpr int64_t kMinParallelBytes = 96 * 1024;

// Activations at or above this magnitude (or not finite) take the float batched path, whose arithmetic
// is the reference's: the GEMV paths multiply x by s or by q - z before the other factor and could
// overflow, and the integer path needs finite values.
constexpr float kGemvMaxAbs = 1.2676506e30f;  // 2^100

// Up to this many rows, the integer (VNNI) path beats dequantizing to float once per tile (measured on
// 4096 x 4096, 4-bit: 1.2x faster at 8 rows, even at 12 to 16).
constexpr int64_t kMaxIntRows = 8;

// The integer path prepares the activations once per task: tasks of about this many weight bytes.
constexpr int64_t kIntTaskBytes = 256 * 1024;

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Units per task for `total` units and at most `most` per task: as few tasks as `most` allows, of even
// sizes (15 tiles at most 14 per task ran as 14 + 1, one thread doing nearly all of the work; now 8 + 7).
int64_t EvenUnits(int64_t total, int64_t most) { return CeilDiv(total, CeilDiv(total, most)); }

// The exact float32 outliers kept beside the quantized weight (CSC over W's rows, i.e. the permuted A).
struct SparseColumns {
  const uint32_t* pointers;  // [N + 1]
  const uint16_t* rows;      // [nnz]
  const float* values;       // [nnz]
};

// The outliers' index arrays must describe a CSC matrix of [K, N] with nnz entries.
void CheckOutliers(const SparseColumns& s, int64_t K, int64_t N, int64_t nnz) {
  auto fail = [](const std::string& message) { ORT_CXX_API_THROW("QuantMatMul: " + message, ORT_INVALID_ARGUMENT); };
  if (s.pointers[0] != 0 || static_cast<int64_t>(s.pointers[N]) != nnz)
    fail("outlier_pointers must start at 0 and end at the outlier count " + std::to_string(nnz));
  for (int64_t n = 0; n < N; ++n)
    if (s.pointers[n] > s.pointers[n + 1]) fail("outlier_pointers must not decrease");
  for (int64_t j = 0; j < nnz; ++j)
    if (s.rows[j] >= K) fail("outlier_rows values must be in [0, " + std::to_string(K) + ")");
}

}  // namespace

// The best kernels this CPU runs; LOWBIT_CPU_ISA=scalar|avx2|avx512|avx512vnni caps the choice (tests use it).
struct QuantMatMulKernel::Isa {
  const IsaKernels* kernels;
  const Int8Kernels* int8;  // int8_activations = 1 (AVX-512 without VNNI uses the AVX2 ones)
  bool vnni;

  Isa() {
    const char* cap = std::getenv("LOWBIT_CPU_ISA");
    const std::string limit = cap ? cap : "avx512vnni";
    const char* levels[] = {"scalar", "avx2", "avx512", "avx512vnni"};
    int level = 0;
    while (level < 4 && limit != levels[level]) ++level;
    if (level == 4)
      ORT_CXX_API_THROW("LOWBIT_CPU_ISA must be scalar, avx2, avx512 or avx512vnni, got '" + limit + "'",
                        ORT_INVALID_ARGUMENT);
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    kernels = level >= 2 && avx512 ? &kAvx512Kernels : level >= 1 && avx2 ? &kAvx2Kernels : &kScalarKernels;
    vnni = level >= 3 && avx512 && __builtin_cpu_supports("avx512vnni");
    int8 = vnni ? &kInt8Avx512VnniKernels : level >= 1 && avx2 ? &kInt8Avx2Kernels : &kInt8ScalarKernels;
  }
};

// Scales and zero points in the layouts of GroupParams (quant_matmul.h); zero points absent = mid-point.
struct QuantMatMulKernel::PreparedParams {
  std::vector<float> scale, zero;
  std::vector<uint8_t> zero_bytes;  // int8_activations: the zero points as the int8 path reads them (int8.h)

  PreparedParams(const QuantMatMulAttributes& at, const ScaleView& scales, const uint8_t* zero_points) {
    const float mid = static_cast<float>(1 << (at.bits - 1));
    auto zero_code = [&](int64_t i) { return zero_points ? static_cast<float>(zero_points[i]) : mid; };
    auto zero_at = [&](int64_t i) { return kMagic + zero_code(i); };
    if (at.group_axis == 0) {
      // [groups][N] -> [tiles][groups][64]; with int8_activations the int8 path's layout (Int8PerOcOffset) and
      // the zero points as bytes only (a quarter of the floats' memory traffic)
      const bool int8 = at.int8_activations;
      auto offset = [&](int64_t t, int64_t j) {
        return int8 ? Int8PerOcOffset(t, j, at.groups) : (t * at.groups + j) * kTile;
      };
      scale.assign(int8 ? Int8PerOcSize(at.tiles, at.groups) : at.tiles * at.groups * kTile, 0.0f);
      if (int8)
        zero_bytes.assign(scale.size(), 0);
      else
        zero.assign(scale.size(), kMagic);
      for (int64_t t = 0; t < at.tiles; ++t)
        for (int64_t j = 0; j < at.groups; ++j) {
          const int64_t to = offset(t, j);
          for (int64_t i = 0, n = t * kTile; i < kTile && n < at.N; ++i, ++n) {
            scale[to + i] = scales[j * at.N + n];
            if (int8)
              zero_bytes[to + i] = static_cast<uint8_t>(zero_code(j * at.N + n));
            else
              zero[to + i] = zero_at(j * at.N + n);
          }
        }
    } else {  // [K][groups] -> [groups][K]
      scale.resize(at.groups * at.K);
      zero.resize(scale.size());
      for (int64_t k = 0; k < at.K; ++k)
        for (int64_t j = 0; j < at.groups; ++j) {
          scale[j * at.K + k] = scales[k * at.groups + j];
          zero[j * at.K + k] = zero_at(k * at.groups + j);
        }
      if (at.int8_activations) {  // [groups][4 * quads + kZeroBytesPad] (int8.h)
        const int64_t stride = at.quads * kQuad + kZeroBytesPad;
        zero_bytes.assign(at.groups * stride, 0);
        for (int64_t j = 0; j < at.groups; ++j)
          for (int64_t k = 0; k < at.K; ++k)
            zero_bytes[j * stride + k] = static_cast<uint8_t>(zero[j * at.K + k] - kMagic);
      }
    }
  }

  GroupParams View() const { return GroupParams{scale.data(), zero.data()}; }
};

QuantMatMulKernel::QuantMatMulKernel(const OrtApi*, const OrtKernelInfo* info)
    : attrs_(Ort::ConstKernelInfo(info)), isa_(std::make_unique<Isa>()) {
  // Scales and zero points that are initializers are prepared once, here.
  Ort::ConstKernelInfo kernel_info(info);
  int scales_constant = 0, zero_points_constant = 0;
  const Ort::ConstValue scales = kernel_info.GetTensorConstantInput(kScales, &scales_constant);
  const bool has_zero_points =
      kernel_info.GetInputCount() > kZeroPoints && !kernel_info.GetInputName(kZeroPoints).empty();
  const Ort::ConstValue zero_points = has_zero_points
                                          ? kernel_info.GetTensorConstantInput(kZeroPoints, &zero_points_constant)
                                          : Ort::ConstValue{nullptr};
  const std::vector<int64_t> params_shape = attrs_.ParamsShape();
  auto has_params_shape = [&](const Ort::ConstValue& value) {
    return value.GetTensorTypeAndShapeInfo().GetShape() == params_shape;
  };
  // (a wrong shape is reported by the first Compute)
  if (scales_constant && has_params_shape(scales) &&
      (!has_zero_points || (zero_points_constant && has_params_shape(zero_points))))
    constant_params_ = std::make_unique<PreparedParams>(
        attrs_, ScalesOf("QuantMatMul", scales), has_zero_points ? zero_points.GetTensorData<uint8_t>() : nullptr);
  // Outlier indices that are initializers are checked once, here (a wrong shape: the first Compute).
  auto present = [&](QuantMatMulInput i) {
    return kernel_info.GetInputCount() > static_cast<size_t>(i) && !kernel_info.GetInputName(i).empty();
  };
  if (present(kOutlierPointers) && present(kOutlierRows)) {
    int pointers_constant = 0, rows_constant = 0;
    const Ort::ConstValue pointers = kernel_info.GetTensorConstantInput(kOutlierPointers, &pointers_constant);
    const Ort::ConstValue rows = kernel_info.GetTensorConstantInput(kOutlierRows, &rows_constant);
    if (pointers_constant && rows_constant) {
      const std::vector<int64_t> rows_shape = rows.GetTensorTypeAndShapeInfo().GetShape();
      if (pointers.GetTensorTypeAndShapeInfo().GetShape() == std::vector<int64_t>{attrs_.N + 1} && rows_shape.size() == 1) {
        CheckOutliers(SparseColumns{pointers.GetTensorData<uint32_t>(), rows.GetTensorData<uint16_t>(), nullptr},
                      attrs_.K, attrs_.N, rows_shape[0]);
        constant_outliers_checked_ = true;
      }
    }
  }
}

QuantMatMulKernel::~QuantMatMulKernel() = default;

namespace {

enum class Path { kInt, kGemv, kGemm, kInt8 };

// y[m][n] += sum of a[m][rows[j]] * values[j] over column n's entries, for columns [n0, n1): the same
// products as a dense matmul with the outliers in place (NaN/Inf propagate), summed apart and added.
// Several rows read A transposed (a_t[K][M]): each entry is then one contiguous, vectorized axpy.
void AddOutliers(const SparseColumns& s, const float* a, const float* a_t, int64_t M, int64_t N, int64_t n0,
                 int64_t n1, float* y) {
  if (M == 1) {
    for (int64_t n = n0; n < n1; ++n) {
      float sum = 0.0f;
      for (uint32_t j = s.pointers[n]; j < s.pointers[n + 1]; ++j) sum += a[s.rows[j]] * s.values[j];
      y[n] += sum;
    }
    return;
  }
  // One tile of columns at a time: the sums of a column are contiguous (sums[c][m]), and the tile is added
  // to y row by row (adding column by column would miss the cache on every row).
  thread_local std::vector<float> sums;
  for (int64_t t0 = n0; t0 < n1; t0 += kTile) {
    const int64_t t1 = std::min(n1, t0 + kTile);
    if (s.pointers[t0] == s.pointers[t1]) continue;
    sums.assign(kTile * M, 0.0f);
    for (int64_t n = t0; n < t1; ++n) {
      float* acc = sums.data() + (n - t0) * M;
      for (uint32_t j = s.pointers[n]; j < s.pointers[n + 1]; ++j) {
        const float* column = a_t + static_cast<int64_t>(s.rows[j]) * M;
        const float value = s.values[j];
        for (int64_t m = 0; m < M; ++m) acc[m] += column[m] * value;
      }
    }
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = t0; n < t1; ++n) y[m * N + n] += sums[(n - t0) * M + m];
  }
}

// out[K][M] = a[M][K], in blocks that keep the written lines in L1 (a plain loop misses on every write).
void Transpose(const float* a, int64_t M, int64_t K, float* out) {
  constexpr int64_t kBlock = 32;
  for (int64_t m0 = 0; m0 < M; m0 += kBlock)
    for (int64_t k0 = 0; k0 < K; k0 += kBlock) {
      const int64_t m1 = std::min(M, m0 + kBlock), k1 = std::min(K, k0 + kBlock);
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t k = k0; k < k1; ++k) out[k * M + m] = a[m * K + k];
    }
}

// One call's work, split over tiles of output channels by ORT's thread pool.
struct Job {
  const IsaKernels* kernels;
  Problem problem;
  const float* a;  // [M][K], permuted
  Path path;
  int64_t tiles, tiles_per_task;
  const SparseColumns* outliers;  // or null
  const float* a_t;               // with outliers and M > 1: a transposed, [K][M]
  const Int8Plan* int8;           // Path::kInt8
  const Int8Rows* int8_rows;      // Path::kInt8, per-OC: the activations, quantized once

  void Run(int64_t task) const {
    const int64_t t0 = task * tiles_per_task, t1 = std::min(tiles, t0 + tiles_per_task);
    thread_local std::vector<float> scratch;  // kept between calls: no page faults per call
    switch (path) {
      case Path::kInt:
        scratch.resize(GemmAvx512VnniScratchBytes(problem) / sizeof(float) + 1);
        GemmAvx512Vnni(problem, a, t0, t1, scratch.data());
        break;
      case Path::kGemv: kernels->gemv(problem, a, t0, t1); break;
      case Path::kInt8:
        scratch.resize(int8->ScratchBytes() / sizeof(float) + 1);
        int8->Run(a, int8_rows, t0, t1, scratch.data());
        break;
      case Path::kGemm:
        scratch.resize((kKBlock + problem.M) * kTile);
        kernels->gemm(problem, a, t0, t1, scratch.data());
        break;
    }
    if (outliers)
      AddOutliers(*outliers, a, a_t, problem.M, problem.N, t0 * kTile, std::min(problem.N, t1 * kTile), problem.y);
  }
};

bool AllBelow(const float* x, int64_t n, float limit) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= std::fabs(x[i]) < limit;  // false for NaN
  return ok;
}

}  // namespace

Ort::Status QuantMatMulKernel::Compute(OrtKernelContext* context) try {
  const QuantMatMulAttributes& at = attrs_;
  Ort::KernelContext ctx(context);
  const QuantMatMulInputs in(ctx, at);
  const int64_t M = in.M;
  float* y = ctx.GetOutput(0, in.y_shape).GetTensorMutableData<float>();
  if (M == 0) return Ort::Status{nullptr};

  const float* a_data = in.a.GetTensorData<float>();
  std::vector<float> permuted;
  if (in.Present(in.perm)) {  // A[..., perm]
    const int64_t* index = in.perm.GetTensorData<int64_t>();
    for (int64_t k = 0; k < at.K; ++k)
      if (index[k] < 0 || index[k] >= at.K)
        return Ort::Status(("QuantMatMul: perm values must be in [0, " + std::to_string(at.K) + ")").c_str(),
                           ORT_INVALID_ARGUMENT);
    permuted.resize(M * at.K);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < at.K; ++k) permuted[m * at.K + k] = a_data[m * at.K + index[k]];
    a_data = permuted.data();
  }

  std::unique_ptr<PreparedParams> call_params;
  if (!constant_params_)
    call_params = std::make_unique<PreparedParams>(
        at, in.scale_values,
        in.Present(in.zero_points) ? in.zero_points.GetTensorData<uint8_t>() : nullptr);
  const PreparedParams& params = constant_params_ ? *constant_params_ : *call_params;

  Job job;
  job.kernels = isa_->kernels;
  job.problem = Problem{M,
                        at.K,
                        at.N,
                        at.bits,
                        at.group_axis,
                        at.group_size,
                        at.groups,
                        in.packed.GetTensorData<uint8_t>(),
                        at.quads,
                        at.block_bytes,
                        params.View(),
                        in.Present(in.bias) ? in.bias.GetTensorData<float>() : nullptr,
                        y};
  job.a = a_data;
  job.tiles = at.tiles;
  SparseColumns outliers{};
  std::vector<float> a_t;
  job.outliers = nullptr;
  job.a_t = nullptr;
  if (in.Present(in.outlier_pointers)) {
    outliers = SparseColumns{in.outlier_pointers.GetTensorData<uint32_t>(), in.outlier_rows.GetTensorData<uint16_t>(),
                             in.outlier_values.GetTensorData<float>()};
    if (!constant_outliers_checked_) CheckOutliers(outliers, at.K, at.N, in.outlier_count);
    job.outliers = &outliers;
    if (M > 1) {
      a_t.resize(at.K * M);
      Transpose(a_data, M, at.K, a_t.data());
      job.a_t = a_t.data();
    }
  }
  // The integer and GEMV paths need tame activations and groups they support; anything else is batched.
  const bool few_tame_rows = M <= kMaxIntRows && AllBelow(a_data, M * at.K, kGemvMaxAbs);
  const bool vector_groups = at.group_axis == 0 || at.groups == 1 || at.group_size % isa_->kernels->lanes == 0;
  job.path = at.int8_activations                                                ? Path::kInt8
             : few_tame_rows && isa_->vnni && GemmAvx512VnniSupports(job.problem) ? Path::kInt
             : few_tame_rows && M == 1 && vector_groups                         ? Path::kGemv
                                                                                : Path::kGemm;
  std::unique_ptr<Int8Plan> int8_plan;
  std::vector<uint8_t> int8_memory;
  Int8Rows int8_rows{};
  job.int8 = nullptr;
  job.int8_rows = nullptr;
  if (job.path == Path::kInt8) {
    int8_plan = std::make_unique<Int8Plan>(job.problem, *isa_->int8, params.zero_bytes.data());
    job.int8 = int8_plan.get();
    if (at.group_axis == 0) {  // quantized once, here (per-IC, each task quantizes them for its output groups)
      int8_memory.resize(int8_plan->RowsBytes() + 64);
      void* aligned = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(int8_memory.data()) + 63) & ~uintptr_t{63});
      int8_rows = int8_plan->Quantize(a_data, nullptr, nullptr, aligned);
      job.int8_rows = &int8_rows;
    }
  }
  job.tiles_per_task = 1;
  if (job.path == Path::kInt || job.path == Path::kInt8) {
    // tasks of whole per-IC groups where groups are whole tiles (the activations are prepared per group)
    const bool whole_groups = at.group_axis == 1 && at.groups > 1 && at.group_size % kTile == 0;
    const int64_t unit = whole_groups ? at.group_size / kTile : 1;
    int64_t units = std::max<int64_t>(1, kIntTaskBytes / (unit * at.quads * at.block_bytes));
    if (job.path == Path::kInt8 && M == 1)  // at least the tiles the one-row kernels stream at once (int8.h)
      units = std::max<int64_t>(units, CeilDiv(kInt8MaxTiles, unit));
    job.tiles_per_task = unit * EvenUnits(CeilDiv(at.tiles, unit), units);
  }

  const int64_t weight_bytes = at.tiles * at.quads * at.block_bytes;
  const int64_t tasks = CeilDiv(at.tiles, job.tiles_per_task);
  if (weight_bytes * M < kMinParallelBytes || tasks == 1) {
    job.tiles_per_task = at.tiles;
    job.Run(0);
  } else {
    ctx.ParallelFor([](void* data, size_t task) { static_cast<const Job*>(data)->Run(static_cast<int64_t>(task)); },
                    static_cast<size_t>(tasks), 0, &job);
  }
  return Ort::Status{nullptr};
} catch (const Ort::Exception& e) {
  return Ort::Status(e);
}

}  // namespace lowbit
