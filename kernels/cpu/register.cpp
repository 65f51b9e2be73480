// The library's only export: RegisterCustomOps adds the "lowbit" domain to a session's options.
#include <onnxruntime_lite_custom_op.h>

#include <memory>
#include <vector>

#include "quant_gather.h"
#include "quant_matmul_op.h"

namespace lowbit {
namespace {

template <class Kernel>
Ort::Custom::OrtLiteCustomOp* MakeOp(const char* name, const char* provider,
                                     const std::vector<ONNXTensorElementDataType>& input_types,
                                     ONNXTensorElementDataType output_type) {
  Ort::Custom::OrtLiteCustomOp* op = Ort::Custom::CreateLiteCustomOp<Kernel>(name, provider);
  // Compute takes the kernel context only, so declare the inputs (see kernels/reference.py) here.
  op->input_types_ = input_types;
  op->output_types_ = {output_type};
  // The Lite API reads an input of undefined type as variadic; ours (the scales, kAnyScaleType) are single
  // optional-position inputs that take several element types.
  op->GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_OPTIONAL; };
  return op;
}

Ort::CustomOpDomain MakeDomain() {
  static const std::unique_ptr<Ort::Custom::OrtLiteCustomOp> cpu_op{MakeOp<QuantMatMulKernel>(
      "QuantMatMul", "CPUExecutionProvider", kQuantMatMulInputTypes, kQuantMatMulOutputType)};
  static const std::unique_ptr<Ort::Custom::OrtLiteCustomOp> gather_op{MakeOp<QuantGatherKernel>(
      "QuantGather", "CPUExecutionProvider", kQuantGatherInputTypes, kQuantGatherOutputType)};
  Ort::CustomOpDomain domain{"lowbit"};
  domain.Add(cpu_op.get());
  domain.Add(gather_op.get());
#ifdef LOWBIT_WITH_CUDA
  // QuantGather runs on CPU only: no CUDA kernel (an embedding lookup reads a few rows per call).
  static const std::unique_ptr<Ort::Custom::OrtLiteCustomOp> cuda_op{MakeOp<QuantMatMulCudaKernel>(
      "QuantMatMul", "CUDAExecutionProvider", kQuantMatMulInputTypes, kQuantMatMulOutputType)};
  domain.Add(cuda_op.get());
#endif
  return domain;
}

}  // namespace
}  // namespace lowbit

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  try {
    static Ort::CustomOpDomain domain = lowbit::MakeDomain();  // one domain for every session
    Ort::UnownedSessionOptions(options).Add(domain);
  } catch (const Ort::Exception& e) {
    return Ort::Status(e).release();
  }
  return nullptr;
}
