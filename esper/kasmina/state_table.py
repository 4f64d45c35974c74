"""`SeedStateTable`: the per-layer seed state as Structure-of-Arrays tensors (module buffers).

Being an `nn.Module` whose tensors are registered buffers, the table moves with `.to(device)`
and is saved and restored by the owning layer's `state_dict()`. The Kasmina ops read and mutate
these tensors in place; nothing lives in hidden C++ globals.
"""

from __future__ import annotations

import torch
from torch import nn

from esper.lifecycle import SeedLifecycleState

TELEMETRY_COLUMNS = 6
# Columns of `alignment`: sum(g*s), sum(g*g), sum(s*s) over TRAINING steps since the last read.
ALIGNMENT_COLUMNS = 3


class SeedStateTable(nn.Module):
    """Buffers of one KasminaLayer with `num_seeds` seed slots (see kasmina_interface.md).

    state int64[S], alpha float32[S], steps_in_state int64[S], epochs_in_state int64[S],
    blueprint_index int64[S] (-1 none), embargo int64[S], telemetry float64[S, 6],
    alignment float64[S, 3] (gradient-alignment accumulators of seeds in TRAINING),
    contribution float64[S] (last counterfactual contribution, NaN when never measured).
    """

    state: torch.Tensor
    alpha: torch.Tensor
    steps_in_state: torch.Tensor
    epochs_in_state: torch.Tensor
    blueprint_index: torch.Tensor
    embargo: torch.Tensor
    telemetry: torch.Tensor
    alignment: torch.Tensor
    contribution: torch.Tensor

    def __init__(self, num_seeds: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        if num_seeds < 1:
            raise ValueError(f"a seed state table needs num_seeds >= 1, got {num_seeds}")
        self.num_seeds = num_seeds
        i64 = {"dtype": torch.int64, "device": device}
        self.register_buffer("state", torch.full((num_seeds,), int(SeedLifecycleState.DORMANT), **i64))
        self.register_buffer("alpha", torch.zeros(num_seeds, dtype=torch.float32, device=device))
        self.register_buffer("steps_in_state", torch.zeros(num_seeds, **i64))
        self.register_buffer("epochs_in_state", torch.zeros(num_seeds, **i64))
        self.register_buffer("blueprint_index", torch.full((num_seeds,), -1, **i64))
        self.register_buffer("embargo", torch.zeros(num_seeds, **i64))
        self.register_buffer(
            "telemetry", torch.zeros(num_seeds, TELEMETRY_COLUMNS, dtype=torch.float64, device=device)
        )
        self.register_buffer(
            "alignment", torch.zeros(num_seeds, ALIGNMENT_COLUMNS, dtype=torch.float64, device=device)
        )
        self.register_buffer(
            "contribution", torch.full((num_seeds,), float("nan"), dtype=torch.float64, device=device)
        )

    _DTYPES = {
        "state": torch.int64,
        "alpha": torch.float32,
        "steps_in_state": torch.int64,
        "epochs_in_state": torch.int64,
        "blueprint_index": torch.int64,
        "embargo": torch.int64,
        "telemetry": torch.float64,
        "alignment": torch.float64,
        "contribution": torch.float64,
    }

    def _apply(self, fn, recurse=True):
        # model.half() / model.double() must move the table, never change its dtypes: the ops
        # require float32 alpha and float64 accumulators whatever the model's precision.
        super()._apply(fn, recurse)
        for name, dtype in self._DTYPES.items():
            buf = getattr(self, name)
            if buf.dtype != dtype:
                setattr(self, name, buf.to(dtype))
        return self

    def extra_repr(self) -> str:
        return f"num_seeds={self.num_seeds}"
