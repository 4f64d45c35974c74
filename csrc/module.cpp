// The Python module `esper._C`. Importing it registers the `esper` torch library (ops.cpp) and
// exposes the non-op pieces: lifecycle names for the parity test, build facts.
#include <torch/extension.h>

#include "cpu/isa_dispatch.h"
#include "esper/lifecycle.h"

namespace esper {
void bind_kernel_cache(pybind11::module_& m);  // kernel_cache.cpp
}  // namespace esper

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Esper Kasmina extension: seed state-table ops and kernel cache";
  esper::bind_kernel_cache(m);
  m.def(
      "lifecycle_states",
      []() {
        std::vector<std::pair<std::string, int64_t>> out;
        for (const auto& entry : esper::kLifecycleStateNames) {
          out.emplace_back(entry.name, static_cast<int64_t>(entry.value));
        }
        return out;
      },
      "SeedLifecycleState (name, value) pairs as compiled into the C++ header.");
  m.def(
      "cpu_kernel_isa", []() { return esper::cpu::cpu_has_avx2() ? "avx2" : "baseline"; },
      "Which build of the CPU kernels' hot loops runs on this machine ('avx2' or 'baseline').");
#ifdef ESPER_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
