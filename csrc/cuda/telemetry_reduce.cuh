// Per-seed reduction kernel shared by telemetry_accumulate_ and grad_telemetry_accumulate_ (CUDA).
//
// Each CTA reduces one contiguous range of the flat activation with coalesced, block-strided
// loads. A thread keeps running sums for the seed it is currently in and flushes them when the
// seed changes, into per-CTA shared accumulators (or straight to global memory when S is too
// large for shared memory); each CTA then adds its accumulators to the telemetry table with one
// atomicAdd per (seed, column). No host-device synchronisation anywhere.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "esper/seed_ops.h"

namespace esper {
namespace cuda {

constexpr int kReduceThreads = 256;
constexpr int64_t kMaxSharedSeeds = 512;  // 3 doubles per seed: 12 KiB of shared memory

struct TelemetryTarget {
  double* data;
  int64_t stride0;
  int64_t stride1;
  __device__ double* at(int64_t seed, int64_t column) const { return data + seed * stride0 + column * stride1; }
};

template <bool kSumSqOnly, typename scalar_t>
__global__ void telemetry_reduce_kernel(const scalar_t* __restrict__ x, int64_t numel, int64_t block,
                                        int64_t num_seeds, int64_t per_cta, TelemetryTarget out,
                                        double dead_threshold, double count_per_seed) {
  using opmath_t = at::opmath_type<scalar_t>;
  extern __shared__ double shared_acc[];  // [S][3] when S <= kMaxSharedSeeds
  const bool use_shared = num_seeds <= kMaxSharedSeeds;
  if (use_shared) {
    for (int64_t k = threadIdx.x; k < num_seeds * 3; k += blockDim.x) {
      shared_acc[k] = 0.0;
    }
    __syncthreads();
  }
  auto flush = [&](int64_t seed, double sum, double sumsq, double dead) {
    if (seed < 0) {
      return;
    }
    if (use_shared) {
      atomicAdd(&shared_acc[seed * 3 + 1], sumsq);
      if (!kSumSqOnly) {
        atomicAdd(&shared_acc[seed * 3 + 0], sum);
        atomicAdd(&shared_acc[seed * 3 + 2], dead);
      }
    } else if (kSumSqOnly) {
      atomicAdd(out.at(seed, kTelemetryGradSq), sumsq);
    } else {
      atomicAdd(out.at(seed, kTelemetrySum), sum);
      atomicAdd(out.at(seed, kTelemetrySumSq), sumsq);
      atomicAdd(out.at(seed, kTelemetryDead), dead);
    }
  };

  const int64_t begin = static_cast<int64_t>(blockIdx.x) * per_cta;
  const int64_t end = min(numel, begin + per_cta);
  int64_t current = -1;
  double sum = 0.0, sumsq = 0.0, dead = 0.0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const int64_t seed = (i / block) % num_seeds;
    if (seed != current) {
      flush(current, sum, sumsq, dead);
      current = seed;
      sum = sumsq = dead = 0.0;
    }
    const double v = static_cast<double>(static_cast<opmath_t>(x[i]));
    sumsq += v * v;
    if (!kSumSqOnly) {
      sum += v;
      dead += v <= dead_threshold ? 1.0 : 0.0;
    }
  }
  flush(current, sum, sumsq, dead);

  if (use_shared) {
    __syncthreads();
    for (int64_t seed = threadIdx.x; seed < num_seeds; seed += blockDim.x) {
      atomicAdd(out.at(seed, kSumSqOnly ? kTelemetryGradSq : kTelemetrySumSq), shared_acc[seed * 3 + 1]);
      if (!kSumSqOnly) {
        atomicAdd(out.at(seed, kTelemetrySum), shared_acc[seed * 3 + 0]);
        atomicAdd(out.at(seed, kTelemetryDead), shared_acc[seed * 3 + 2]);
      }
    }
  }
  // Per-call constants (element count, one backward step) are added once, by CTA 0; no other CTA
  // writes these columns, so no atomics are needed.
  if (blockIdx.x == 0) {
    for (int64_t seed = threadIdx.x; seed < num_seeds; seed += blockDim.x) {
      if (kSumSqOnly) {
        *out.at(seed, kTelemetryGradSteps) += 1.0;
      } else {
        *out.at(seed, kTelemetryCount) += count_per_seed;
      }
    }
  }
}

// Launches the reduction of contiguous `x` into `telemetry` on the current stream.
template <bool kSumSqOnly>
void launch_telemetry_reduce(const at::Tensor& x, const at::Tensor& telemetry,
                             const ChunkLayout& layout, double dead_threshold) {
  int device = x.get_device();
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t work_per_cta = static_cast<int64_t>(kReduceThreads) * 16;
  const int64_t ctas = std::max<int64_t>(
      1, std::min<int64_t>((layout.numel + work_per_cta - 1) / work_per_cta, static_cast<int64_t>(sms) * 4));
  const int64_t per_cta = std::max<int64_t>(1, (layout.numel + ctas - 1) / ctas);
  const size_t shared_bytes =
      layout.num_seeds <= kMaxSharedSeeds ? static_cast<size_t>(layout.num_seeds) * 3 * sizeof(double) : 0;
  const TelemetryTarget target{telemetry.mutable_data_ptr<double>(), telemetry.stride(0), telemetry.stride(1)};
  const double count_per_seed = static_cast<double>(layout.numel / layout.num_seeds);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "telemetry_reduce_cuda", [&] {
    telemetry_reduce_kernel<kSumSqOnly, scalar_t><<<static_cast<unsigned int>(ctas), kReduceThreads, shared_bytes,
                                                    stream>>>(x.const_data_ptr<scalar_t>(), layout.numel,
                                                              layout.block, layout.num_seeds, per_cta, target,
                                                              dead_threshold, count_per_seed);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace esper
