#include <ATen/ATen.h>
#include <torch/library.h>

#include "esper/lifecycle.h"

namespace esper {
namespace {

at::Tensor count_states_cpu(const at::Tensor& state) {
  TORCH_CHECK(state.scalar_type() == at::kLong, "count_states: expected an int64 state table, got ",
              state.scalar_type());
  TORCH_CHECK(state.dim() == 1, "count_states: expected a 1-D state table, got ", state.dim(), " dims");
  auto counts = at::zeros({kNumLifecycleStates}, state.options());
  auto s = state.contiguous();
  const int64_t* src = s.data_ptr<int64_t>();
  int64_t* dst = counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < s.numel(); ++i) {
    TORCH_CHECK(src[i] >= 0 && src[i] < kNumLifecycleStates, "count_states: state[", i, "] = ", src[i],
                " is not a SeedLifecycleState (expected 0..", kNumLifecycleStates - 1, ")");
    dst[src[i]] += 1;
  }
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(esper, CPU, m) { m.impl("count_states", &count_states_cpu); }

}  // namespace esper
