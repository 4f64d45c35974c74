// Operator schemas for the `esper` torch library. Implementations are registered per backend in
// csrc/cpu/*.cpp and csrc/cuda/*.cu; the Python side adds fake (meta) kernels and autograd.
#include <torch/library.h>

TORCH_LIBRARY(esper, m) {
  // Histogram of lifecycle states over a state table: int64[kNumLifecycleStates].
  m.def("count_states(Tensor state) -> Tensor");
}
