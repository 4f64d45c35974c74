// Runtime choice of an AVX2 build of a hot loop on x86-64 (the extension itself is compiled for
// the baseline ISA, which has only SSE2). A loop body marked ESPER_ALWAYS_INLINE and called from
// a function marked ESPER_TARGET_AVX2 is compiled for AVX2 there; `cpu_has_avx2()` picks which
// instantiation runs. Other architectures get the baseline build only. Results are bitwise the
// same either way: no FMA is enabled, so only the vector width changes (a test checks this by
// setting ESPER_CPU_BASELINE=1, which forces the baseline build).
#pragma once

#include <cstdlib>

#if defined(__GNUC__) && defined(__x86_64__)
#define ESPER_TARGET_AVX2 __attribute__((target("avx2")))
#define ESPER_ALWAYS_INLINE inline __attribute__((always_inline))
#define ESPER_HAVE_AVX2_DISPATCH 1
#else
#define ESPER_TARGET_AVX2
#define ESPER_ALWAYS_INLINE inline
#define ESPER_HAVE_AVX2_DISPATCH 0
#endif

namespace esper {
namespace cpu {

inline bool cpu_has_avx2() {
#if ESPER_HAVE_AVX2_DISPATCH
  static const bool has = __builtin_cpu_supports("avx2") && std::getenv("ESPER_CPU_BASELINE") == nullptr;
  return has;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace esper
