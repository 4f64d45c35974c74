"""Side passes that must leave a model as they found it (shape probes, statistics, trial losses)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def buffers_and_mode_kept(model: nn.Module) -> Iterator[None]:
    """Inside: anything goes; on exit every buffer that existed on entry (BatchNorm running
    statistics, seed tables) holds its old value again and the train/eval mode is restored.
    Parameters are not touched: callers that step an optimizer save those themselves."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    was_training = model.training
    try:
        yield
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n])
        model.train(was_training)
