// CPU kernel of grad_telemetry_accumulate_: per seed chunk, GRAD_SQ += sum(grad*grad) and
// GRAD_STEPS += 1 (one backward pass). Accumulates in float64.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "esper/seed_ops.h"
#include "telemetry_reduce.h"

namespace esper {
namespace {

void grad_telemetry_accumulate_cpu(const at::Tensor& grad, const at::Tensor& telemetry) {
  const char* op = "grad_telemetry_accumulate_";
  check_floating(op, "grad", grad);
  check_telemetry(op, telemetry, grad);
  TORCH_CHECK(grad.device().is_cpu(), op, ": CPU kernel called with a tensor on ", grad.device());
  const ChunkLayout layout = chunk_layout(op, grad, telemetry.size(0));
  auto gc = grad.contiguous();
  auto acc = telemetry.accessor<double, 2>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "grad_telemetry_accumulate_cpu",
                                  [&] {
                                    const auto sums = cpu::reduce_per_seed</*kSumSqOnly=*/true>(
                                        gc.const_data_ptr<scalar_t>(), layout, 0.0);
                                    for (int64_t s = 0; s < layout.num_seeds; ++s) {
                                      acc[s][kTelemetryGradSq] += sums[s].sumsq;
                                      acc[s][kTelemetryGradSteps] += 1.0;
                                    }
                                  });
}

}  // namespace

TORCH_LIBRARY_IMPL(esper, CPU, m) { m.impl("grad_telemetry_accumulate_", &grad_telemetry_accumulate_cpu); }

}  // namespace esper
