"""Python side of the `torch.ops.esper` operators: fake (meta) kernels, autograd and wrappers.

Importing this module loads `esper._C` (which registers the C++/CUDA kernels).
"""

from __future__ import annotations

import torch

from esper._extension import load

_C = load()

NUM_LIFECYCLE_STATES = 12


@torch.library.register_fake("esper::count_states")
def _count_states_fake(state: torch.Tensor) -> torch.Tensor:
    return state.new_empty((NUM_LIFECYCLE_STATES,))


def count_states(state: torch.Tensor) -> torch.Tensor:
    """Histogram of lifecycle states in a state table (int64 tensor of length 12)."""
    return torch.ops.esper.count_states(state)


# TEMPORARY (layer branch): the ops helper replaces these with the C++ ops on merge.
from esper.kasmina import reference as _ref  # noqa: E402

TELEMETRY_SUM = _ref.TELEMETRY_SUM
TELEMETRY_SUMSQ = _ref.TELEMETRY_SUMSQ
TELEMETRY_DEAD = _ref.TELEMETRY_DEAD
TELEMETRY_COUNT = _ref.TELEMETRY_COUNT
TELEMETRY_GRAD_SQ = _ref.TELEMETRY_GRAD_SQ
TELEMETRY_GRAD_STEPS = _ref.TELEMETRY_GRAD_STEPS
TELEMETRY_COLUMNS = 6
seed_blend = _ref.seed_blend
telemetry_accumulate_ = _ref.telemetry_accumulate_
grad_telemetry_accumulate_ = _ref.grad_telemetry_accumulate_
lifecycle_advance_ = _ref.lifecycle_advance_
telemetry_readout = _ref.telemetry_readout
telemetry_reset_ = _ref.telemetry_reset_
