// What lowbit's ops check when ONNX Runtime builds and calls them: the attributes of a packed weight W[K, N]
// (kernels/packing.py), input shapes, and error messages that start with the op's name. Included by the
// op files only (op_io.cpp, quant_gather.cpp), never by the per-ISA kernel files (see kernels_impl.h).
#pragma once

#include <onnxruntime_cxx_api.h>

#include <string>
#include <vector>

namespace lowbit {

[[noreturn]] void FailOp(const char* op, const std::string& message);  // throws ORT_INVALID_ARGUMENT
void CheckShapeOf(const char* op, const char* name, const Ort::ConstValue& value,
                  const std::vector<int64_t>& expected);
inline bool Present(const Ort::ConstValue& value) { return static_cast<const OrtValue*>(value) != nullptr; }

// The group scales as the ops read them: stored as float32 or float16 (half the bytes; the kernels compute in
// float32 either way). Declared with kAnyScaleType, so ScalesOf checks the element type.
constexpr ONNXTensorElementDataType kAnyScaleType = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
struct ScaleView {
  const float* f32 = nullptr;
  const uint16_t* f16 = nullptr;  // float16 bits
  float operator[](int64_t i) const { return f32 ? f32[i] : Ort::Float16_t::FromBits(f16[i]).ToFloat(); }
};
ScaleView ScalesOf(const char* op, const Ort::ConstValue& scales);  // throws unless float32 or float16

// The attributes that describe a packed weight, shared by QuantMatMul and QuantGather: bits, group_axis,
// group_size, K, N, validated with messages naming `op`, and the sizes they imply.
struct PackedWeightAttributes {
  int bits, group_axis;
  int64_t group_size, K, N;
  int64_t groups, tiles, quads, block_bytes;  // implied

  PackedWeightAttributes(const Ort::ConstKernelInfo& info, const char* op);  // throws on invalid values
  std::vector<int64_t> ParamsShape() const;                                 // of scales and zero points
};

}  // namespace lowbit
