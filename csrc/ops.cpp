// Operator schemas for the `esper` torch library. Implementations are registered per backend in
// csrc/cpu/*.cpp and csrc/cuda/*.cu; the Python side (esper/kasmina/ops.py) adds fake (meta)
// kernels and autograd. The contract is written down in the docstrings of esper/kasmina/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(esper, m) {
  // Histogram of lifecycle states over a state table: int64[kNumLifecycleStates].
  m.def("count_states(Tensor state) -> Tensor");
  // out = host + w_fwd[state, alpha] * finite(seed), per seed channel chunk of [N, C, *].
  m.def("seed_blend(Tensor host, Tensor seed, Tensor state, Tensor alpha) -> Tensor");
  // grad_seed = isfinite(seed) ? w_bwd[state, alpha] * grad_out : 0 (grad_host is grad_out itself).
  m.def("seed_blend_backward(Tensor grad_out, Tensor seed, Tensor state, Tensor alpha) -> Tensor");
  // telemetry[S, 6] (float64) += per-chunk sum, sum of squares, dead count, element count.
  m.def("telemetry_accumulate_(Tensor x, Tensor(a!) telemetry, float dead_threshold) -> ()");
  // telemetry[:, GRAD_SQ] += per-chunk sum(grad^2); telemetry[:, GRAD_STEPS] += 1.
  m.def("grad_telemetry_accumulate_(Tensor grad, Tensor(a!) telemetry) -> ()");
  // steps_in_state += 1 for live seeds; GRAFTING alpha = min(1, alpha + alpha_step).
  m.def("lifecycle_advance_(Tensor state, Tensor(a!) alpha, Tensor(b!) steps_in_state, float alpha_step) -> ()");
}
