// The library's only export: RegisterCustomOps adds the "lowbit" domain to a session's options.
#include <onnxruntime_lite_custom_op.h>

#include <memory>

#include "quant_matmul_op.h"

namespace lowbit {
namespace {

template <class Kernel>
Ort::Custom::OrtLiteCustomOp* MakeOp(const char* provider) {
  Ort::Custom::OrtLiteCustomOp* op = Ort::Custom::CreateLiteCustomOp<Kernel>("QuantMatMul", provider);
  // Compute takes the kernel context only, so declare the inputs (see kernels/reference.py) here.
  op->input_types_ = kQuantMatMulInputTypes;
  op->output_types_ = {kQuantMatMulOutputType};
  return op;
}

Ort::CustomOpDomain MakeDomain() {
  static const std::unique_ptr<Ort::Custom::OrtLiteCustomOp> cpu_op{MakeOp<QuantMatMulKernel>("CPUExecutionProvider")};
  Ort::CustomOpDomain domain{"lowbit"};
  domain.Add(cpu_op.get());
#ifdef LOWBIT_WITH_CUDA
  static const std::unique_ptr<Ort::Custom::OrtLiteCustomOp> cuda_op{
      MakeOp<QuantMatMulCudaKernel>("CUDAExecutionProvider")};
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
