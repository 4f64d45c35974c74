// CPU kernel of lifecycle_advance_: one training step for the whole state table. Counts a step
// for every live seed and ramps GRAFTING alphas; state transitions stay in Python (gate checks).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "esper/seed_ops.h"

namespace esper {
namespace {

void lifecycle_advance_cpu(const at::Tensor& state, const at::Tensor& alpha, const at::Tensor& steps_in_state,
                           double alpha_step) {
  check_lifecycle(state, alpha, steps_in_state, alpha_step);
  TORCH_CHECK(state.device().is_cpu(), "lifecycle_advance_: CPU kernel called with a tensor on ",
              state.device());
  auto st = state.accessor<int64_t, 1>();
  auto al = alpha.accessor<float, 1>();
  auto steps = steps_in_state.accessor<int64_t, 1>();
  const float step = static_cast<float>(alpha_step);
  for (int64_t i = 0; i < st.size(0); ++i) {
    const int64_t s = st[i];
    if (counts_steps(s)) {
      steps[i] += 1;
    }
    if (s == static_cast<int64_t>(SeedLifecycleState::GRAFTING)) {
      const float a = al[i] + step;
      al[i] = a > 1.0f ? 1.0f : a;  // NaN stays NaN, like torch.clamp
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(esper, CPU, m) { m.impl("lifecycle_advance_", &lifecycle_advance_cpu); }

}  // namespace esper
