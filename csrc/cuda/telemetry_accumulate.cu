// CUDA kernel of telemetry_accumulate_ (see telemetry_reduce.cuh for the reduction scheme).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "esper/seed_ops.h"
#include "telemetry_reduce.cuh"

namespace esper {
namespace {

void telemetry_accumulate_cuda(const at::Tensor& x, const at::Tensor& telemetry, double dead_threshold) {
  const char* op = "telemetry_accumulate_";
  check_floating(op, "x", x);
  check_telemetry(op, telemetry, x);
  TORCH_CHECK(x.is_cuda(), op, ": CUDA kernel called with a tensor on ", x.device());
  const ChunkLayout layout = chunk_layout(op, x, telemetry.size(0));
  const c10::cuda::CUDAGuard guard(x.device());
  cuda::launch_telemetry_reduce</*kSumSqOnly=*/false>(x.contiguous(), telemetry,
                                                       layout, dead_threshold);
}

}  // namespace

TORCH_LIBRARY_IMPL(esper, CUDA, m) { m.impl("telemetry_accumulate_", &telemetry_accumulate_cuda); }

}  // namespace esper
