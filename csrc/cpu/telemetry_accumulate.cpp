// CPU kernel of telemetry_accumulate_: per seed chunk, SUM += sum(x), SUMSQ += sum(x*x),
// DEAD += count(x <= dead_threshold), COUNT += numel(chunk). Accumulates in float64.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "esper/seed_ops.h"
#include "telemetry_reduce.h"

namespace esper {
namespace {

void telemetry_accumulate_cpu(const at::Tensor& x, const at::Tensor& telemetry, double dead_threshold) {
  const char* op = "telemetry_accumulate_";
  check_floating(op, "x", x);
  check_telemetry(op, telemetry, x);
  TORCH_CHECK(x.device().is_cpu(), op, ": CPU kernel called with a tensor on ", x.device());
  const ChunkLayout layout = chunk_layout(op, x, telemetry.size(0));
  auto xc = x.contiguous();
  auto acc = telemetry.accessor<double, 2>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "telemetry_accumulate_cpu", [&] {
    const auto sums = cpu::reduce_per_seed</*kSumSqOnly=*/false>(xc.const_data_ptr<scalar_t>(), layout,
                                                                 dead_threshold);
    const double count = static_cast<double>(layout.numel / layout.num_seeds);
    for (int64_t s = 0; s < layout.num_seeds; ++s) {
      acc[s][kTelemetrySum] += sums[s].sum;
      acc[s][kTelemetrySumSq] += sums[s].sumsq;
      acc[s][kTelemetryDead] += sums[s].dead;
      acc[s][kTelemetryCount] += count;
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(esper, CPU, m) { m.impl("telemetry_accumulate_", &telemetry_accumulate_cpu); }

}  // namespace esper
