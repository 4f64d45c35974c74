// Per-seed reduction driver shared by telemetry_accumulate_ and grad_telemetry_accumulate_ (CPU).
//
// The flat activation is cut into at most one range per thread; each range reduces into its own
// [S, 3] partial (sum, sum of squares, dead count) and the partials are added in range order, so
// a result depends only on the thread count, never on scheduling.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <vector>

#include "esper/seed_ops.h"
#include "isa_dispatch.h"

namespace esper {
namespace cpu {

constexpr int64_t kReduceGrain = 32768;
constexpr int kLanes = 8;  // independent accumulators: lets the compiler vectorise without reassociating

struct SegmentSums {
  double sum = 0.0;
  double sumsq = 0.0;
  double dead = 0.0;
};

template <bool kSumSqOnly, typename scalar_t>
ESPER_ALWAYS_INLINE SegmentSums reduce_segment_body(const scalar_t* x, int64_t n, double dead_threshold) {
  std::array<double, kLanes> sum{}, sumsq{};
  std::array<int64_t, kLanes> dead{};  // an integer count vectorises better than adding 1.0/0.0
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const double v = static_cast<double>(x[i + k]);
      sumsq[k] += v * v;
      if constexpr (!kSumSqOnly) {
        sum[k] += v;
        dead[k] += v <= dead_threshold;
      }
    }
  }
  for (int k = 0; i < n; ++i, ++k) {
    const double v = static_cast<double>(x[i]);
    sumsq[k] += v * v;
    if constexpr (!kSumSqOnly) {
      sum[k] += v;
      dead[k] += v <= dead_threshold;
    }
  }
  SegmentSums out;
  for (int k = 0; k < kLanes; ++k) {
    out.sum += sum[k];
    out.sumsq += sumsq[k];
    out.dead += static_cast<double>(dead[k]);
  }
  return out;
}

template <bool kSumSqOnly, typename scalar_t>
SegmentSums reduce_segment_baseline(const scalar_t* x, int64_t n, double dead_threshold) {
  return reduce_segment_body<kSumSqOnly>(x, n, dead_threshold);
}

template <bool kSumSqOnly, typename scalar_t>
ESPER_TARGET_AVX2 SegmentSums reduce_segment_avx2(const scalar_t* x, int64_t n, double dead_threshold) {
  return reduce_segment_body<kSumSqOnly>(x, n, dead_threshold);
}

template <bool kSumSqOnly, typename scalar_t>
inline SegmentSums reduce_segment(const scalar_t* x, int64_t n, double dead_threshold) {
  return cpu_has_avx2() ? reduce_segment_avx2<kSumSqOnly>(x, n, dead_threshold)
                        : reduce_segment_baseline<kSumSqOnly>(x, n, dead_threshold);
}

// Returns per-seed sums as a vector of S entries. `x` must be contiguous.
template <bool kSumSqOnly, typename scalar_t>
std::vector<SegmentSums> reduce_per_seed(const scalar_t* x, const ChunkLayout& layout, double dead_threshold) {
  const int64_t ranges = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), (layout.numel + kReduceGrain - 1) / kReduceGrain));
  std::vector<SegmentSums> partial(static_cast<size_t>(ranges * layout.num_seeds));
  at::parallel_for(0, ranges, 1, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const int64_t begin = layout.numel * r / ranges;
      const int64_t end = layout.numel * (r + 1) / ranges;
      int64_t i = begin;
      while (i < end) {
        const int64_t block = i / layout.block;
        const int64_t stop = std::min(end, (block + 1) * layout.block);
        const SegmentSums s = reduce_segment<kSumSqOnly>(x + i, stop - i, dead_threshold);
        SegmentSums& p = partial[r * layout.num_seeds + block % layout.num_seeds];
        p.sum += s.sum;
        p.sumsq += s.sumsq;
        p.dead += s.dead;
        i = stop;
      }
    }
  });
  std::vector<SegmentSums> total(static_cast<size_t>(layout.num_seeds));
  for (int64_t r = 0; r < ranges; ++r) {
    for (int64_t s = 0; s < layout.num_seeds; ++s) {
      const SegmentSums& p = partial[r * layout.num_seeds + s];
      total[s].sum += p.sum;
      total[s].sumsq += p.sumsq;
      total[s].dead += p.dead;
    }
  }
  return total;
}

}  // namespace cpu
}  // namespace esper
