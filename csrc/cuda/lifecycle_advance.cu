// CUDA kernel of lifecycle_advance_: one thread per seed, no host-device synchronisation.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "esper/seed_ops.h"

namespace esper {
namespace {

__global__ void lifecycle_advance_kernel(const int64_t* __restrict__ state, int64_t state_stride,
                                         float* __restrict__ alpha, int64_t alpha_stride,
                                         int64_t* __restrict__ steps, int64_t steps_stride, int64_t num_seeds,
                                         float alpha_step) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= num_seeds) {
    return;
  }
  const int64_t s = state[i * state_stride];
  if (counts_steps(s)) {
    steps[i * steps_stride] += 1;
  }
  if (s == static_cast<int64_t>(SeedLifecycleState::GRAFTING)) {
    const float a = alpha[i * alpha_stride] + alpha_step;
    alpha[i * alpha_stride] = a > 1.0f ? 1.0f : a;  // NaN stays NaN, like torch.clamp
  }
}

void lifecycle_advance_cuda(const at::Tensor& state, const at::Tensor& alpha, const at::Tensor& steps_in_state,
                            double alpha_step) {
  check_lifecycle(state, alpha, steps_in_state, alpha_step);
  TORCH_CHECK(state.is_cuda(), "lifecycle_advance_: CUDA kernel called with a tensor on ", state.device());
  const int64_t n = state.size(0);
  if (n == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(state.device());
  const int threads = 128;
  const int blocks = static_cast<int>((n + threads - 1) / threads);
  // Strided access: alpha and steps_in_state are mutated in place, so no contiguous copies.
  lifecycle_advance_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      state.const_data_ptr<int64_t>(), state.stride(0), alpha.mutable_data_ptr<float>(), alpha.stride(0),
      steps_in_state.mutable_data_ptr<int64_t>(), steps_in_state.stride(0), n, static_cast<float>(alpha_step));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(esper, CUDA, m) { m.impl("lifecycle_advance_", &lifecycle_advance_cuda); }

}  // namespace esper
