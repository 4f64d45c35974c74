"""Seeds made from compiled kernels (artifacts loaded by `esper.tezzeret.load_kernel_artifact`).

A loaded artifact keeps its parameters one level down (under ``graph.``); `seed_from_kernel` gives
each seed its own copy whose state dict uses the names the Kasmina builder uses, so a checkpoint
of a seed that ran a compiled kernel loads anywhere (a resume in any services mode,
`esper-export`), and tags it with its blueprint id so a checkpoint load keeps it.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

from torch import nn

from esper.v1 import common_pb2


def _flatten_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "graph.")]:
        state_dict[prefix + key[len(prefix) + len("graph."):]] = state_dict.pop(key)


def _nest_keys(state_dict: dict, prefix: str, *args: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "graph.")]:
        state_dict[prefix + "graph." + key[len(prefix):]] = state_dict.pop(key)


def adopt_kernel(module: nn.Module, blueprint_id: str) -> nn.Module:
    """Make a loaded artifact checkpoint-compatible with built seeds, in place (see module doc)."""
    module.blueprint_id = blueprint_id
    module._register_state_dict_hook(_flatten_keys)
    module._register_load_state_dict_pre_hook(_nest_keys)
    return module


def seed_from_kernel(kernel: nn.Module, spec: common_pb2.BlueprintSpec) -> nn.Module:
    """A seed module of blueprint `spec` that owns its parameters: a copy of the loaded `kernel`
    (which stays untouched in the kernel cache for the next seed)."""
    with warnings.catch_warnings():  # torch's pytree warns about its own LeafSpec inside deepcopy
        warnings.simplefilter("ignore", FutureWarning)
        seed = copy.deepcopy(kernel)
    return adopt_kernel(seed, spec.blueprint_id)
