// CUDA kernels of seed_blend and seed_blend_backward: one grid-stride elementwise pass each. The
// seed of element i is (i / block) % S (see ChunkLayout); indices are 32-bit when they fit.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "esper/seed_ops.h"

namespace esper {
namespace {

constexpr int kThreads = 256;

inline int grid_for(int64_t numel) {
  return static_cast<int>(std::min<int64_t>((numel + kThreads - 1) / kThreads, 65535));
}

template <typename scalar_t, typename index_t>
__global__ void seed_blend_kernel(const scalar_t* __restrict__ host, const scalar_t* __restrict__ seed,
                                  const int64_t* __restrict__ state, const float* __restrict__ alpha,
                                  scalar_t* __restrict__ out, index_t numel, index_t block, index_t num_seeds) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (index_t i = blockIdx.x * blockDim.x + threadIdx.x; i < numel;
       i += static_cast<index_t>(blockDim.x) * gridDim.x) {
    const index_t s = (i / block) % num_seeds;
    const opmath_t w = forward_weight<opmath_t>(state[s], alpha[s]);
    const opmath_t v = static_cast<opmath_t>(seed[i]);
    const opmath_t finite_v = isfinite(v) ? v : opmath_t(0);
    out[i] = static_cast<scalar_t>(static_cast<opmath_t>(host[i]) + w * finite_v);
  }
}

template <typename scalar_t, typename index_t>
__global__ void seed_blend_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ seed,
                                           const int64_t* __restrict__ state, const float* __restrict__ alpha,
                                           scalar_t* __restrict__ out, index_t numel, index_t block,
                                           index_t num_seeds) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (index_t i = blockIdx.x * blockDim.x + threadIdx.x; i < numel;
       i += static_cast<index_t>(blockDim.x) * gridDim.x) {
    const index_t s = (i / block) % num_seeds;
    const opmath_t w = backward_weight<opmath_t>(state[s], alpha[s]);
    const opmath_t v = static_cast<opmath_t>(seed[i]);
    out[i] = isfinite(v) ? static_cast<scalar_t>(w * static_cast<opmath_t>(grad[i])) : scalar_t(0);
  }
}

template <typename Launch>
void with_index_type(int64_t numel, Launch&& launch) {
  if (numel <= std::numeric_limits<int32_t>::max()) {
    launch(int32_t{});
  } else {
    launch(int64_t{});
  }
}

at::Tensor seed_blend_cuda(const at::Tensor& host, const at::Tensor& seed, const at::Tensor& state,
                           const at::Tensor& alpha) {
  const ChunkLayout layout = check_blend("seed_blend", "host", host, seed, state, alpha);
  TORCH_CHECK(host.is_cuda(), "seed_blend: CUDA kernel called with a tensor on ", host.device());
  const c10::cuda::CUDAGuard guard(host.device());
  auto h = host.contiguous();
  auto s = seed.contiguous();
  auto st = state.contiguous();
  auto al = alpha.contiguous();
  auto out = at::empty_like(h, at::MemoryFormat::Contiguous);
  if (layout.numel == 0) {
    return out;
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "seed_blend_cuda", [&] {
    with_index_type(layout.numel, [&](auto index) {
      using index_t = decltype(index);
      seed_blend_kernel<scalar_t, index_t><<<grid_for(layout.numel), kThreads, 0, stream>>>(
          h.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), st.const_data_ptr<int64_t>(),
          al.const_data_ptr<float>(), out.mutable_data_ptr<scalar_t>(), static_cast<index_t>(layout.numel),
          static_cast<index_t>(layout.block), static_cast<index_t>(layout.num_seeds));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor seed_blend_backward_cuda(const at::Tensor& grad_out, const at::Tensor& seed, const at::Tensor& state,
                                    const at::Tensor& alpha) {
  const ChunkLayout layout = check_blend("seed_blend_backward", "grad_out", grad_out, seed, state, alpha);
  TORCH_CHECK(grad_out.is_cuda(), "seed_blend_backward: CUDA kernel called with a tensor on ", grad_out.device());
  const c10::cuda::CUDAGuard guard(grad_out.device());
  auto g = grad_out.contiguous();
  auto s = seed.contiguous();
  auto st = state.contiguous();
  auto al = alpha.contiguous();
  auto out = at::empty_like(s, at::MemoryFormat::Contiguous);
  if (layout.numel == 0) {
    return out;
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "seed_blend_backward_cuda", [&] {
    with_index_type(layout.numel, [&](auto index) {
      using index_t = decltype(index);
      seed_blend_backward_kernel<scalar_t, index_t><<<grid_for(layout.numel), kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), st.const_data_ptr<int64_t>(),
          al.const_data_ptr<float>(), out.mutable_data_ptr<scalar_t>(), static_cast<index_t>(layout.numel),
          static_cast<index_t>(layout.block), static_cast<index_t>(layout.num_seeds));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(esper, CUDA, m) {
  m.impl("seed_blend", &seed_blend_cuda);
  m.impl("seed_blend_backward", &seed_blend_backward_cuda);
}

}  // namespace esper
