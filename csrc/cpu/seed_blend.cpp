// CPU kernels of seed_blend and seed_blend_backward.
//
// The activation [N, C, *] is walked as one flat contiguous buffer split into N * S blocks (seed i
// owns every block b with b % S == i), parallelised over element ranges so both "many small
// blocks" and "one huge block" shapes use every thread. Reduced precision types compute in float.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "esper/seed_ops.h"
#include "isa_dispatch.h"

namespace esper {
namespace {

constexpr int64_t kGrain = 32768;

// Calls fn(begin, end, seed) for each maximal run of [range_begin, range_end) inside one block.
template <typename Fn>
inline void for_each_segment(const ChunkLayout& layout, int64_t range_begin, int64_t range_end, Fn&& fn) {
  int64_t i = range_begin;
  while (i < range_end) {
    const int64_t block = i / layout.block;
    const int64_t stop = std::min(range_end, (block + 1) * layout.block);
    fn(i, stop, block % layout.num_seeds);
    i = stop;
  }
}

template <typename opmath_t>
std::vector<opmath_t> seed_weights(const at::Tensor& state, const at::Tensor& alpha, bool backward) {
  auto st = state.contiguous();
  auto al = alpha.contiguous();
  const int64_t* s = st.data_ptr<int64_t>();
  const float* a = al.data_ptr<float>();
  std::vector<opmath_t> w(st.numel());
  for (int64_t i = 0; i < st.numel(); ++i) {
    w[i] = backward ? backward_weight<opmath_t>(s[i], a[i]) : forward_weight<opmath_t>(s[i], a[i]);
  }
  return w;
}

// The inner loops are written so that gcc/clang vectorise them at -O3 for the baseline ISA
// (checked with -fopt-info-vec): no calls, no data-dependent branches, and the finiteness test
// as `v - v == 0` (NaN for NaN and +-Inf), a compare-and-select the vectoriser handles. They
// measured ~2x faster than at::vec::Vectorized, whose portable fallback is all this extension
// gets without ATen's per-CPU dispatch; on x86-64 an AVX2 build is picked at runtime
// (isa_dispatch.h). `v - v == 0` relies on IEEE semantics: never build with -ffast-math or
// -ffinite-math-only.

// out[i] = host[i] + w * (isfinite(seed[i]) ? seed[i] : 0)
template <typename scalar_t, typename opmath_t>
ESPER_ALWAYS_INLINE void blend_segment(const scalar_t* __restrict host, const scalar_t* __restrict seed,
                                       scalar_t* __restrict out, int64_t n, opmath_t w) {
  for (int64_t i = 0; i < n; ++i) {
    const opmath_t v = static_cast<opmath_t>(seed[i]);
    const opmath_t finite_v = (v - v == opmath_t(0)) ? v : opmath_t(0);
    out[i] = static_cast<scalar_t>(static_cast<opmath_t>(host[i]) + w * finite_v);
  }
}

// grad_seed[i] = isfinite(seed[i]) ? w * grad[i] : 0
template <typename scalar_t, typename opmath_t>
ESPER_ALWAYS_INLINE void blend_backward_segment(const scalar_t* __restrict grad,
                                                const scalar_t* __restrict seed, scalar_t* __restrict out,
                                                int64_t n, opmath_t w) {
  for (int64_t i = 0; i < n; ++i) {
    const opmath_t v = static_cast<opmath_t>(seed[i]);
    const opmath_t g = static_cast<opmath_t>(grad[i]);
    // Select, then scale (not the reverse): the shape gcc if-converts under -ftrapping-math.
    out[i] = static_cast<scalar_t>(w * ((v - v == opmath_t(0)) ? g : opmath_t(0)));
  }
}

// One instantiation per ISA of each loop (see isa_dispatch.h).
template <bool kBackward, typename scalar_t, typename opmath_t>
void blend_range_baseline(const scalar_t* a, const scalar_t* seed, scalar_t* out, int64_t n, opmath_t w) {
  if constexpr (kBackward) {
    blend_backward_segment<scalar_t, opmath_t>(a, seed, out, n, w);
  } else {
    blend_segment<scalar_t, opmath_t>(a, seed, out, n, w);
  }
}

template <bool kBackward, typename scalar_t, typename opmath_t>
ESPER_TARGET_AVX2 void blend_range_avx2(const scalar_t* a, const scalar_t* seed, scalar_t* out, int64_t n,
                                        opmath_t w) {
  if constexpr (kBackward) {
    blend_backward_segment<scalar_t, opmath_t>(a, seed, out, n, w);
  } else {
    blend_segment<scalar_t, opmath_t>(a, seed, out, n, w);
  }
}

template <bool kBackward, typename scalar_t, typename opmath_t>
void blend_range(const scalar_t* a, const scalar_t* seed, scalar_t* out, int64_t n, opmath_t w) {
  if (cpu::cpu_has_avx2()) {
    blend_range_avx2<kBackward, scalar_t, opmath_t>(a, seed, out, n, w);
  } else {
    blend_range_baseline<kBackward, scalar_t, opmath_t>(a, seed, out, n, w);
  }
}

at::Tensor seed_blend_cpu(const at::Tensor& host, const at::Tensor& seed, const at::Tensor& state,
                          const at::Tensor& alpha) {
  const ChunkLayout layout = check_blend("seed_blend", "host", host, seed, state, alpha);
  TORCH_CHECK(host.device().is_cpu(), "seed_blend: CPU kernel called with a tensor on ", host.device());
  auto h = host.contiguous();
  auto s = seed.contiguous();
  auto out = at::empty_like(h, at::MemoryFormat::Contiguous);
  if (layout.numel == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "seed_blend_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto w = seed_weights<opmath_t>(state, alpha, /*backward=*/false);
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, layout.numel, kGrain, [&](int64_t begin, int64_t end) {
      for_each_segment(layout, begin, end, [&](int64_t b, int64_t e, int64_t seed_index) {
        blend_range<false, scalar_t, opmath_t>(hp + b, sp + b, op + b, e - b, w[seed_index]);
      });
    });
  });
  return out;
}

at::Tensor seed_blend_backward_cpu(const at::Tensor& grad_out, const at::Tensor& seed, const at::Tensor& state,
                                   const at::Tensor& alpha) {
  const ChunkLayout layout = check_blend("seed_blend_backward", "grad_out", grad_out, seed, state, alpha);
  TORCH_CHECK(grad_out.device().is_cpu(), "seed_blend_backward: CPU kernel called with a tensor on ",
              grad_out.device());
  auto g = grad_out.contiguous();
  auto s = seed.contiguous();
  auto out = at::empty_like(s, at::MemoryFormat::Contiguous);
  if (layout.numel == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "seed_blend_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto w = seed_weights<opmath_t>(state, alpha, /*backward=*/true);
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, layout.numel, kGrain, [&](int64_t begin, int64_t end) {
      for_each_segment(layout, begin, end, [&](int64_t b, int64_t e, int64_t seed_index) {
        blend_range<true, scalar_t, opmath_t>(gp + b, sp + b, op + b, e - b, w[seed_index]);
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(esper, CPU, m) {
  m.impl("seed_blend", &seed_blend_cpu);
  m.impl("seed_blend_backward", &seed_blend_backward_cpu);
}

}  // namespace esper
