// lowbit::QuantMatMul on ONNX Runtime's CUDA execution provider: checks, then the kernel on ORT's stream.
#include "quant_matmul_cuda.h"

#include <string>

#include "quant_matmul_op.h"

namespace lowbit {

QuantMatMulCudaKernel::QuantMatMulCudaKernel(const OrtApi*, const OrtKernelInfo* info)
    : attrs_(Ort::ConstKernelInfo(info)) {
  if (attrs_.int8_activations)
    ORT_CXX_API_THROW("QuantMatMul: int8_activations = 1 is implemented on the CPU provider only", ORT_NOT_IMPLEMENTED);
}

Ort::Status QuantMatMulCudaKernel::Compute(OrtKernelContext* context) try {
  const QuantMatMulAttributes& at = attrs_;
  Ort::KernelContext ctx(context);
  const QuantMatMulInputs in(ctx, at);
  float* y = ctx.GetOutput(0, in.y_shape).GetTensorMutableData<float>();
  if (in.M == 0) return Ort::Status{nullptr};
  auto data = [&](const Ort::ConstValue& value) { return in.Present(value) ? value.GetTensorRawData() : nullptr; };
  const CudaProblem problem{in.M,
                            at.K,
                            at.N,
                            at.bits,
                            at.group_axis,
                            at.group_size,
                            at.groups,
                            static_cast<const uint8_t*>(data(in.packed)),
                            at.quads,
                            at.block_bytes,
                            in.scale_values.f32,  // device pointers, one of them null
                            in.scale_values.f16,
                            static_cast<const uint8_t*>(data(in.zero_points)),
                            static_cast<const int64_t*>(data(in.perm)),
                            static_cast<const float*>(data(in.bias)),
                            static_cast<const float*>(data(in.a)),
                            y,
                            static_cast<const uint32_t*>(data(in.outlier_pointers)),
                            static_cast<const uint16_t*>(data(in.outlier_rows)),
                            static_cast<const float*>(data(in.outlier_values)),
                            in.outlier_count};
  if (const char* error = LaunchQuantMatMulCuda(problem, ctx.GetGPUComputeStream()))
    return Ort::Status((std::string("QuantMatMul (CUDA): ") + error).c_str(), ORT_RUNTIME_EXCEPTION);
  return Ort::Status{nullptr};
} catch (const Ort::Exception& e) {
  return Ort::Status(e);
}

}  // namespace lowbit
