// The interface of lowbit::QuantMatMul (specified in kernels/reference.py): attribute and shape checks
// shared by its CPU and CUDA kernels.
#include <string>
#include <vector>

#include "op_checks.h"
#include "quant_matmul.h"
#include "quant_matmul_op.h"

namespace lowbit {
namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

constexpr const char* kOp = "QuantMatMul";

[[noreturn]] void Fail(const std::string& message) { FailOp(kOp, message); }

void CheckShape(const char* name, const Ort::ConstValue& value, const std::vector<int64_t>& expected) {
  CheckShapeOf(kOp, name, value, expected);
}

// An optional int attribute: its value, or `absent` when the node does not have it.
int64_t OptionalAttribute(const Ort::ConstKernelInfo& info, const char* name, int64_t absent) {
  int64_t value = absent;
  OrtStatus* status = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, &value);
  if (status != nullptr) {
    Ort::GetApi().ReleaseStatus(status);
    return absent;
  }
  return value;
}

}  // namespace

void FailOp(const char* op, const std::string& message) {
  ORT_CXX_API_THROW(std::string(op) + ": " + message, ORT_INVALID_ARGUMENT);
}

void CheckShapeOf(const char* op, const char* name, const Ort::ConstValue& value,
                  const std::vector<int64_t>& expected) {
  const std::vector<int64_t> actual = value.GetTensorTypeAndShapeInfo().GetShape();
  if (actual != expected)
    FailOp(op, std::string(name) + " must have shape " + ShapeString(expected) + ", got " + ShapeString(actual));
}

PackedWeightAttributes::PackedWeightAttributes(const Ort::ConstKernelInfo& info, const char* op)
    : bits(static_cast<int>(info.GetAttribute<int64_t>("bits"))),
      group_axis(static_cast<int>(info.GetAttribute<int64_t>("group_axis"))),
      group_size(info.GetAttribute<int64_t>("group_size")),
      K(info.GetAttribute<int64_t>("K")),
      N(info.GetAttribute<int64_t>("N")) {
  if (bits != 2 && bits != 3 && bits != 4 && bits != 5 && bits != 6 && bits != 8)
    FailOp(op, "bits must be 2, 3, 4, 5, 6 or 8, got " + std::to_string(bits));
  if (group_axis != 0 && group_axis != 1) FailOp(op, "group_axis must be 0 or 1");
  if (group_size < 1 || K < 1 || N < 1) FailOp(op, "group_size, K and N must be >= 1");
  groups = CeilDiv(group_axis == 0 ? K : N, group_size);
  tiles = CeilDiv(N, kTile);
  quads = CeilDiv(K, kQuad);
  block_bytes = kTile * kQuad * bits / 8;
}

ScaleView ScalesOf(const char* op, const Ort::ConstValue& scales) {
  switch (scales.GetTensorTypeAndShapeInfo().GetElementType()) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
      return ScaleView{scales.GetTensorData<float>(), nullptr};
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
      return ScaleView{nullptr, static_cast<const uint16_t*>(scales.GetTensorRawData())};
    default:
      FailOp(op, "scales must be float32 or float16");
  }
}

std::vector<int64_t> PackedWeightAttributes::ParamsShape() const {
  return group_axis == 0 ? std::vector<int64_t>{groups, N} : std::vector<int64_t>{K, groups};
}

const std::vector<ONNXTensorElementDataType> kQuantMatMulInputTypes = {
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, kAnyScaleType,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};

QuantMatMulAttributes::QuantMatMulAttributes(const Ort::ConstKernelInfo& info)
    : PackedWeightAttributes(info, kOp) {
  const int64_t int8 = OptionalAttribute(info, "int8_activations", 0);
  if (int8 != 0 && int8 != 1) Fail("int8_activations must be 0 or 1, got " + std::to_string(int8));
  int8_activations = int8 == 1;
}

QuantMatMulInputs::QuantMatMulInputs(const Ort::KernelContext& ctx, const QuantMatMulAttributes& at) {
  const size_t count = ctx.GetInputCount();
  if (count < 3) Fail("needs inputs A, packed and scales");
  auto input = [&](QuantMatMulInput i) {
    return i < static_cast<int>(count) ? ctx.GetInput(i) : Ort::ConstValue{nullptr};
  };
  a = input(kA);
  packed = input(kPacked);
  scales = input(kScales);
  zero_points = input(kZeroPoints);
  perm = input(kPerm);
  bias = input(kBias);
  outlier_pointers = input(kOutlierPointers);
  outlier_rows = input(kOutlierRows);
  outlier_values = input(kOutlierValues);
  y_shape = a.GetTensorTypeAndShapeInfo().GetShape();
  if (y_shape.empty() || y_shape.back() != at.K)
    Fail("A must have shape [..., " + std::to_string(at.K) + "], got " + ShapeString(y_shape));
  CheckShape("packed", packed, {at.tiles, at.quads, at.block_bytes});
  CheckShape("scales", scales, at.ParamsShape());
  scale_values = ScalesOf(kOp, scales);
  if (Present(zero_points)) CheckShape("zero_points", zero_points, at.ParamsShape());
  if (Present(perm)) CheckShape("perm", perm, {at.K});
  if (Present(bias)) CheckShape("bias", bias, {at.N});
  const int outlier_inputs = Present(outlier_pointers) + Present(outlier_rows) + Present(outlier_values);
  if (outlier_inputs != 0 && outlier_inputs != 3)
    Fail("outlier_pointers, outlier_rows and outlier_values go together: give all three or none");
  if (outlier_inputs == 3) {
    CheckShape("outlier_pointers", outlier_pointers, {at.N + 1});
    const std::vector<int64_t> rows_shape = outlier_rows.GetTensorTypeAndShapeInfo().GetShape();
    if (rows_shape.size() != 1) Fail("outlier_rows must be 1-D, got " + ShapeString(rows_shape));
    outlier_count = rows_shape[0];
    CheckShape("outlier_values", outlier_values, {outlier_count});
  }
  M = 1;
  for (size_t i = 0; i + 1 < y_shape.size(); ++i) M *= y_shape[i];
  y_shape.back() = at.N;
}

Ort::Status InferQuantMatMulShape(Ort::ShapeInferContext& ctx) try {
  Ort::ShapeInferContext::Shape shape = ctx.GetInputShape(kA);
  if (shape.empty()) return Ort::Status("QuantMatMul: A must have rank >= 1", ORT_INVALID_ARGUMENT);
  shape.back() = Ort::ShapeInferContext::SymbolicInteger(ctx.GetAttrInt("N"));
  return ctx.SetOutputShape(0, shape);
} catch (const Ort::Exception& e) {
  return Ort::Status(e);
}

}  // namespace lowbit
