#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "esper/lifecycle.h"

namespace esper {
namespace {

__global__ void count_states_kernel(const int64_t* __restrict__ state, int64_t n,
                                    unsigned long long* __restrict__ counts) {
  for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
    int64_t v = state[i];
    if (v >= 0 && v < kNumLifecycleStates) {
      atomicAdd(&counts[v], 1ULL);
    }
  }
}

at::Tensor count_states_cuda(const at::Tensor& state) {
  TORCH_CHECK(state.scalar_type() == at::kLong, "count_states: expected an int64 state table, got ",
              state.scalar_type());
  TORCH_CHECK(state.dim() == 1, "count_states: expected a 1-D state table, got ", state.dim(), " dims");
  const c10::cuda::CUDAGuard guard(state.device());
  auto s = state.contiguous();
  auto counts = at::zeros({kNumLifecycleStates}, s.options());
  const int64_t n = s.numel();
  if (n > 0) {
    const int threads = 256;
    const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 1024));
    count_states_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        s.data_ptr<int64_t>(), n, reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(esper, CUDA, m) { m.impl("count_states", &count_states_cuda); }

}  // namespace esper
