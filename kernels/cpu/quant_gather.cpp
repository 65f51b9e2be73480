// lowbit::QuantGather on ONNX Runtime's CPU execution provider (specified in kernels/reference.py): for each
// id n, column n of the packed QuantMatMul weight W[K, N] dequantized, out[..., k] = float(q[k, n] - z) * s.
// An embedding lookup reads a few rows per call, so this is scalar and single-threaded; each code is decoded
// once per id (CodeAt reads it in place; no table is unpacked).
#include "quant_gather.h"

#include <string>
#include <vector>

#include "codes.h"
#include "op_checks.h"
#include "quant_matmul.h"

namespace lowbit {
namespace {

constexpr const char* kOp = "QuantGather";

[[noreturn]] void Fail(const std::string& message) { FailOp(kOp, message); }

void CheckShape(const char* name, const Ort::ConstValue& value, const std::vector<int64_t>& expected) {
  CheckShapeOf(kOp, name, value, expected);
}

}  // namespace

const std::vector<ONNXTensorElementDataType> kQuantGatherInputTypes = {
    ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, kAnyScaleType,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8};

QuantGatherAttributes::QuantGatherAttributes(const Ort::ConstKernelInfo& info) : PackedWeightAttributes(info, kOp) {}

QuantGatherKernel::QuantGatherKernel(const OrtApi*, const OrtKernelInfo* info) : attrs_(Ort::ConstKernelInfo(info)) {}

Ort::Status QuantGatherKernel::InferOutputShape(Ort::ShapeInferContext& ctx) try {
  // An ids input of unknown rank reads as rank 0 here; the kernel writes the true shape at run time.
  Ort::ShapeInferContext::Shape shape = ctx.GetInputShape(kGatherIds);
  shape.emplace_back(ctx.GetAttrInt("K"));
  return ctx.SetOutputShape(0, shape);
} catch (const Ort::Exception& e) {
  return Ort::Status(e);
}

Ort::Status QuantGatherKernel::Compute(OrtKernelContext* context) try {
  const QuantGatherAttributes& at = attrs_;
  Ort::KernelContext ctx(context);
  const size_t count = ctx.GetInputCount();
  if (count < 3) Fail("needs inputs packed, ids and scales");
  const Ort::ConstValue packed = ctx.GetInput(kGatherPacked);
  const Ort::ConstValue ids = ctx.GetInput(kGatherIds);
  const Ort::ConstValue scales = ctx.GetInput(kGatherScales);
  const Ort::ConstValue zero_points =
      count > kGatherZeroPoints ? ctx.GetInput(kGatherZeroPoints) : Ort::ConstValue{nullptr};
  CheckShape("packed", packed, {at.tiles, at.quads, at.block_bytes});
  CheckShape("scales", scales, at.ParamsShape());
  const ScaleView s = ScalesOf(kOp, scales);
  if (Present(zero_points)) CheckShape("zero_points", zero_points, at.ParamsShape());

  const Ort::TensorTypeAndShapeInfo ids_info = ids.GetTensorTypeAndShapeInfo();
  std::vector<int64_t> out_shape = ids_info.GetShape();
  const int64_t rows = static_cast<int64_t>(ids_info.GetElementCount());
  const int64_t* id = ids.GetTensorData<int64_t>();
  for (int64_t r = 0; r < rows; ++r)  // all checked before anything is written
    if (id[r] < -at.N || id[r] >= at.N)
      Fail("id " + std::to_string(id[r]) + " is out of range for N = " + std::to_string(at.N) + " (ids must be in [" +
           std::to_string(-at.N) + ", " + std::to_string(at.N) + "))");
  out_shape.push_back(at.K);
  float* out = ctx.GetOutput(0, out_shape).GetTensorMutableData<float>();

  const uint8_t* codes = packed.GetTensorData<uint8_t>();
  const uint8_t* z = Present(zero_points) ? zero_points.GetTensorData<uint8_t>() : nullptr;
  const int mid = 1 << (at.bits - 1);
  for (int64_t r = 0; r < rows; ++r, out += at.K) {
    const int64_t n = id[r] < 0 ? id[r] + at.N : id[r];
    const int c = static_cast<int>(n % kTile);
    const uint8_t* tile = codes + (n / kTile) * at.quads * at.block_bytes;
    for (int64_t k = 0; k < at.K; ++k) {
      // the group parameters of (k, n): [groups][N] per-OC, [K][groups] per-IC
      const int64_t p = at.group_axis == 0 ? (k / at.group_size) * at.N + n : k * at.groups + n / at.group_size;
      const int q = CodeAt(tile + (k / kQuad) * at.block_bytes, at.bits, static_cast<int>(k % kQuad), c);
      out[k] = static_cast<float>(q - (z ? z[p] : mid)) * s[p];  // one float32 product, as DequantizeLinear
    }
  }
  return Ort::Status{nullptr};
} catch (const Ort::Exception& e) {
  return Ort::Status(e);
}

}  // namespace lowbit
