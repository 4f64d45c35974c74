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
