"""The seed lifecycle states.

`esper.v1.SeedLifecycleState` in proto/esper/v1/common.proto is the source of truth; this enum and
csrc/include/esper/lifecycle.h mirror it (values and names without the `SEED_LIFECYCLE_STATE_`
prefix), and tests/test_lifecycle_parity.py fails if any of the three disagree.
"""

from enum import IntEnum


class SeedLifecycleState(IntEnum):
    UNSPECIFIED = 0
    DORMANT = 1
    GERMINATED = 2
    TRAINING = 3
    GRAFTING = 4
    STABILIZATION = 5
    EVALUATING = 6
    FINE_TUNING = 7
    FOSSILIZED = 8
    CULLED = 9
    CANCELLED = 10
    ROLLED_BACK = 11

    @classmethod
    def from_proto(cls, value: int) -> "SeedLifecycleState":
        return cls(int(value))

    def to_proto(self) -> int:
        return int(self)


PROTO_PREFIX = "SEED_LIFECYCLE_STATE_"
