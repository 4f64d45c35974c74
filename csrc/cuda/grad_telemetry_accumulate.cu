// CUDA kernel of grad_telemetry_accumulate_ (see telemetry_reduce.cuh for the reduction scheme).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "esper/seed_ops.h"
#include "telemetry_reduce.cuh"

namespace esper {
namespace {

void grad_telemetry_accumulate_cuda(const at::Tensor& grad, const at::Tensor& telemetry) {
  const char* op = "grad_telemetry_accumulate_";
  check_floating(op, "grad", grad);
  check_telemetry(op, telemetry, grad);
  TORCH_CHECK(grad.is_cuda(), op, ": CUDA kernel called with a tensor on ", grad.device());
  const ChunkLayout layout = chunk_layout(op, grad, telemetry.size(0));
  const c10::cuda::CUDAGuard guard(grad.device());
  cuda::launch_telemetry_reduce</*kSumSqOnly=*/true>(grad.contiguous(),
                                                      telemetry, layout, 0.0);
}

}  // namespace

TORCH_LIBRARY_IMPL(esper, CUDA, m) { m.impl("grad_telemetry_accumulate_", &grad_telemetry_accumulate_cuda); }

}  // namespace esper
