// lowbit::QuantMatMul as ONNX Runtime sees it: attributes and inputs checked against the op spec
// (kernels/reference.py, op_io.cpp), shared by the CPU kernel and the CUDA kernel, both written for the
// Lite custom-op API (Ort::Custom::CreateLiteCustomOp).
#pragma once

// Every translation unit is compiled with -DORT_API_MANUAL_INIT (kernels/build.py): the API table comes
// from RegisterCustomOps (register.cpp), whatever the include order.
#include <onnxruntime_cxx_api.h>

#include <memory>
#include <vector>

#include "op_checks.h"

namespace lowbit {

enum QuantMatMulInput {
  kA = 0,
  kPacked,
  kScales,
  kZeroPoints,
  kPerm,
  kBias,
  kOutlierPointers,  // the sparse outliers, CSC: column pointers, rows, values (all or none)
  kOutlierRows,
  kOutlierValues,
  kNumInputs
};

// The element types of the inputs, in order, and of the output.
extern const std::vector<ONNXTensorElementDataType> kQuantMatMulInputTypes;
constexpr ONNXTensorElementDataType kQuantMatMulOutputType = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;

struct QuantMatMulAttributes : PackedWeightAttributes {
  bool int8_activations;  // optional attribute, default 0

  explicit QuantMatMulAttributes(const Ort::ConstKernelInfo& info);  // throws on invalid values
};

// The inputs of one call, with checked shapes; absent optional inputs are null values.
struct QuantMatMulInputs {
  Ort::ConstValue a{nullptr}, packed{nullptr}, scales{nullptr}, zero_points{nullptr}, perm{nullptr}, bias{nullptr};
  Ort::ConstValue outlier_pointers{nullptr}, outlier_rows{nullptr}, outlier_values{nullptr};
  ScaleView scale_values;    // the scales as float32 or float16, type checked
  int64_t M = 0;             // rows of A
  int64_t outlier_count = 0;  // nnz of the sparse outliers (0 when absent)
  std::vector<int64_t> y_shape;

  QuantMatMulInputs(const Ort::KernelContext& ctx, const QuantMatMulAttributes& at);  // throws on bad shapes
  static bool Present(const Ort::ConstValue& value) { return lowbit::Present(value); }
};

// Y has A's shape with the last dimension N.
Ort::Status InferQuantMatMulShape(Ort::ShapeInferContext& ctx);

// Inputs are read from the kernel context (not as Lite tensor arguments): an absent optional input in
// the middle (no zero points, but a permutation) has no value the Lite argument types could bind to.
struct QuantMatMulKernel {
  QuantMatMulKernel(const OrtApi* api, const OrtKernelInfo* info);
  ~QuantMatMulKernel();
  Ort::Status Compute(OrtKernelContext* context);
  static Ort::Status InferOutputShape(Ort::ShapeInferContext& ctx) { return InferQuantMatMulShape(ctx); }

 private:
  struct PreparedParams;
  struct Isa;
  QuantMatMulAttributes attrs_;
  std::unique_ptr<Isa> isa_;
  std::unique_ptr<PreparedParams> constant_params_;
  bool constant_outliers_checked_ = false;  // outlier indices are initializers, checked at construction
};

// The CUDA kernel (kernels/cuda/quant_matmul_cuda.cpp), built when nvcc is found.
struct QuantMatMulCudaKernel {
  QuantMatMulCudaKernel(const OrtApi* api, const OrtKernelInfo* info);
  Ort::Status Compute(OrtKernelContext* context);
  static Ort::Status InferOutputShape(Ort::ShapeInferContext& ctx) { return InferQuantMatMulShape(ctx); }

 private:
  QuantMatMulAttributes attrs_;
};

}  // namespace lowbit
