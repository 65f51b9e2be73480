// lowbit::QuantGather as ONNX Runtime sees it (specified in kernels/reference.py): the rows of an embedding
// table T = W^T read as columns of a QuantMatMul weight W[K, N], from the same packed codes, scales and
// zero points, so that a tied embedding and LM head store the table once. CPU only.
#pragma once

// Every translation unit is compiled with -DORT_API_MANUAL_INIT (kernels/build.py).
#include <onnxruntime_cxx_api.h>

#include <vector>

#include "op_checks.h"

namespace lowbit {

enum QuantGatherInput { kGatherPacked = 0, kGatherIds, kGatherScales, kGatherZeroPoints, kGatherNumInputs };

// The element types of the inputs, in order, and of the output.
extern const std::vector<ONNXTensorElementDataType> kQuantGatherInputTypes;
constexpr ONNXTensorElementDataType kQuantGatherOutputType = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;

// The attributes describing W, as QuantMatMul's (without int8_activations, which concerns activations).
struct QuantGatherAttributes : PackedWeightAttributes {
  explicit QuantGatherAttributes(const Ort::ConstKernelInfo& info);  // throws on invalid values
};

// Inputs are read from the kernel context, like QuantMatMul's (an absent zero_points is a null value).
struct QuantGatherKernel {
  QuantGatherKernel(const OrtApi* api, const OrtKernelInfo* info);
  Ort::Status Compute(OrtKernelContext* context);
  // Output: ids' shape followed by K.
  static Ort::Status InferOutputShape(Ort::ShapeInferContext& ctx);

 private:
  QuantGatherAttributes attrs_;
};

}  // namespace lowbit
