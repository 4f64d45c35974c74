// Seed lifecycle states. Mirrors `esper.v1.SeedLifecycleState` in proto/esper/v1/common.proto;
// tests/test_lifecycle_parity.py fails if the two (or the Python enum) disagree.
#pragma once

#include <cstdint>

namespace esper {

enum class SeedLifecycleState : int64_t {
  UNSPECIFIED = 0,
  DORMANT = 1,
  GERMINATED = 2,
  TRAINING = 3,
  GRAFTING = 4,
  STABILIZATION = 5,
  EVALUATING = 6,
  FINE_TUNING = 7,
  FOSSILIZED = 8,
  CULLED = 9,
  CANCELLED = 10,
  ROLLED_BACK = 11,
};

constexpr int64_t kNumLifecycleStates = 12;  // including UNSPECIFIED

// (name, value) pairs in declaration order, exported to Python for the parity test.
struct LifecycleStateName {
  const char* name;
  SeedLifecycleState value;
};

constexpr LifecycleStateName kLifecycleStateNames[] = {
    {"UNSPECIFIED", SeedLifecycleState::UNSPECIFIED},
    {"DORMANT", SeedLifecycleState::DORMANT},
    {"GERMINATED", SeedLifecycleState::GERMINATED},
    {"TRAINING", SeedLifecycleState::TRAINING},
    {"GRAFTING", SeedLifecycleState::GRAFTING},
    {"STABILIZATION", SeedLifecycleState::STABILIZATION},
    {"EVALUATING", SeedLifecycleState::EVALUATING},
    {"FINE_TUNING", SeedLifecycleState::FINE_TUNING},
    {"FOSSILIZED", SeedLifecycleState::FOSSILIZED},
    {"CULLED", SeedLifecycleState::CULLED},
    {"CANCELLED", SeedLifecycleState::CANCELLED},
    {"ROLLED_BACK", SeedLifecycleState::ROLLED_BACK},
};

}  // namespace esper
