// Shared pieces of the Kasmina seed ops: blend weights per lifecycle state, telemetry column
// layout, and the precondition checks every backend runs before touching memory. Header-only so
// the CPU (.cpp) and CUDA (.cu) translation units see identical rules.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "esper/lifecycle.h"

namespace esper {

// Columns of the float64[S, 6] telemetry table (mirrored in esper/kasmina/ops.py).
constexpr int64_t kTelemetrySum = 0;
constexpr int64_t kTelemetrySumSq = 1;
constexpr int64_t kTelemetryDead = 2;
constexpr int64_t kTelemetryCount = 3;
constexpr int64_t kTelemetryGradSq = 4;
constexpr int64_t kTelemetryGradSteps = 5;
constexpr int64_t kTelemetryColumns = 6;

// Weight of a seed's output in the host output (forward). TRAINING is straight-through: the
// value is the host's exactly, so its forward weight is 0 while its backward weight is 1.
template <typename T>
C10_HOST_DEVICE inline T forward_weight(int64_t state, float alpha) {
  switch (state) {
    case static_cast<int64_t>(SeedLifecycleState::GRAFTING):
    case static_cast<int64_t>(SeedLifecycleState::STABILIZATION):
    case static_cast<int64_t>(SeedLifecycleState::EVALUATING):
    case static_cast<int64_t>(SeedLifecycleState::FINE_TUNING):
    case static_cast<int64_t>(SeedLifecycleState::FOSSILIZED):
      return static_cast<T>(alpha);
    default:
      return T(0);
  }
}

// Weight applied to grad_out to form the seed's gradient.
template <typename T>
C10_HOST_DEVICE inline T backward_weight(int64_t state, float alpha) {
  if (state == static_cast<int64_t>(SeedLifecycleState::TRAINING)) {
    return T(1);
  }
  return forward_weight<T>(state, alpha);
}

// True for every state whose steps_in_state counter advances each training step.
C10_HOST_DEVICE inline bool counts_steps(int64_t state) {
  return state != static_cast<int64_t>(SeedLifecycleState::DORMANT) &&
         state != static_cast<int64_t>(SeedLifecycleState::UNSPECIFIED);
}

// Layout facts of an activation [N, C, *] split into S equal channel chunks, viewed as a flat
// contiguous buffer of N * S blocks of `block` elements; block b belongs to seed b % S.
struct ChunkLayout {
  int64_t num_seeds;
  int64_t block;  // (C / S) * prod(trailing dims)
  int64_t numel;
};

inline ChunkLayout chunk_layout(const char* op, const at::Tensor& x, int64_t num_seeds) {
  TORCH_CHECK(num_seeds >= 1, op, ": expected at least one seed, got a state table of ", num_seeds);
  TORCH_CHECK(x.dim() >= 2, op, ": expected an activation of shape [N, C, *] (2 or more dims), got shape ",
              x.sizes());
  const int64_t channels = x.size(1);
  TORCH_CHECK(channels % num_seeds == 0, op, ": the channel dim C = ", channels,
              " must be divisible by the number of seeds S = ", num_seeds, " (C % S == 0), got C % S = ",
              channels % num_seeds);
  int64_t inner = 1;
  for (int64_t d = 2; d < x.dim(); ++d) {
    inner *= x.size(d);
  }
  return ChunkLayout{num_seeds, (channels / num_seeds) * inner, x.numel()};
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": expected `", name,
              "` to be a floating-point tensor (float16, bfloat16, float32 or float64), got ",
              t.scalar_type());
}

inline void check_table(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype,
                        int64_t length, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": expected `", name, "` of dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1, op, ": expected `", name, "` to be 1-D [S], got shape ", t.sizes());
  TORCH_CHECK(length < 0 || t.size(0) == length, op, ": expected `", name, "` of length S = ", length,
              " (one entry per seed), got ", t.size(0));
  TORCH_CHECK(t.device() == like.device(), op, ": expected `", name, "` on ", like.device(),
              " like the other inputs, got ", t.device());
}

inline void check_telemetry(const char* op, const at::Tensor& telemetry, const at::Tensor& x) {
  TORCH_CHECK(telemetry.scalar_type() == at::kDouble, op,
              ": expected `telemetry` of dtype float64 (accumulators), got ", telemetry.scalar_type());
  TORCH_CHECK(telemetry.dim() == 2 && telemetry.size(1) == kTelemetryColumns, op,
              ": expected `telemetry` of shape [S, ", kTelemetryColumns, "], got ", telemetry.sizes());
  TORCH_CHECK(telemetry.device() == x.device(), op, ": expected `telemetry` on ", x.device(),
              " like the activation, got ", telemetry.device());
}

// Checks shared by seed_blend (host, seed) and seed_blend_backward (grad_out, seed).
inline ChunkLayout check_blend(const char* op, const char* first_name, const at::Tensor& first,
                               const at::Tensor& seed, const at::Tensor& state, const at::Tensor& alpha) {
  check_floating(op, first_name, first);
  TORCH_CHECK(seed.sizes() == first.sizes(), op, ": expected `seed` with the same shape as `", first_name,
              "` ", first.sizes(), ", got ", seed.sizes());
  TORCH_CHECK(seed.scalar_type() == first.scalar_type(), op, ": expected `seed` of the same dtype as `",
              first_name, "` (", first.scalar_type(), "), got ", seed.scalar_type());
  TORCH_CHECK(seed.device() == first.device(), op, ": expected `seed` on ", first.device(), " like `",
              first_name, "`, got ", seed.device());
  check_table(op, "state", state, at::kLong, -1, first);
  check_table(op, "alpha", alpha, at::kFloat, state.size(0), first);
  return chunk_layout(op, first, state.size(0));
}

inline void check_lifecycle(const at::Tensor& state, const at::Tensor& alpha, const at::Tensor& steps,
                            double alpha_step) {
  const char* op = "lifecycle_advance_";
  TORCH_CHECK(state.scalar_type() == at::kLong && state.dim() == 1, op,
              ": expected `state` to be an int64 [S] tensor, got ", state.scalar_type(), " of shape ",
              state.sizes());
  check_table(op, "alpha", alpha, at::kFloat, state.size(0), state);
  check_table(op, "steps_in_state", steps, at::kLong, state.size(0), state);
  TORCH_CHECK(std::isfinite(alpha_step) && alpha_step >= 0.0, op,
              ": expected a finite, non-negative alpha_step, got ", alpha_step);
}

}  // namespace esper
