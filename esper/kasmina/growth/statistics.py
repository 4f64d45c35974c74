"""Gradient statistics of a width pair on a few batches, for gradient-informed initialisation.

One forward/backward per batch records, at the pair: the producer's input `x`, the consumer's
input `z` and the gradient `delta = dL/d(consumer output)`. Nothing trains: parameter gradients are
cleared afterwards and every buffer (BatchNorm statistics, seed telemetry) is restored, so the run
continues exactly as if the pass had not happened (its FLOPs are the caller's growth overhead).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from esper.kasmina.growth.pair import WidthPair, pair_modules
from esper.kasmina.model_state import buffers_and_mode_kept


@dataclass
class PairStatistics:
    """Captured tensors of a pair, batches concatenated along dim 0."""

    x: torch.Tensor      # producer input
    z: torch.Tensor      # consumer input (the existing units, as the consumer reads them)
    delta: torch.Tensor  # dL/d(consumer output), summed-loss scale

    @property
    def samples(self) -> int:
        return int(self.x.shape[0])


def capture_statistics(model: nn.Module, pair: WidthPair, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                       loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> PairStatistics:
    """Runs `loss_fn(model(x), y)` forward/backward on `batches` and records the pair's tensors."""
    mods = pair_modules(model, pair)
    xs, zs, deltas = [], [], []

    def pre(mod, args):
        xs.append(args[0].detach())

    def consumer_pre(mod, args):
        zs.append(args[0].detach())

    def post(mod, args, out):
        if out.requires_grad:
            out.register_hook(lambda g: deltas.append(g.detach()))
        return out

    handles = [mods.producer.register_forward_pre_hook(pre), mods.consumer.register_forward_pre_hook(consumer_pre),
               mods.consumer.register_forward_hook(post)]
    try:
        with buffers_and_mode_kept(model), torch.enable_grad():
            model.train()
            for x, y in batches:
                loss = loss_fn(model(x), y)
                # Summed over the batch so statistics of several batches add up.
                (loss * x.shape[0]).backward()
    finally:
        for h in handles:
            h.remove()
        for p in model.parameters():
            p.grad = None
    if not deltas:
        raise ValueError(f"width pair {pair.key}: no gradient reached the consumer; expected batches "
                         "whose loss depends on the pair")
    return PairStatistics(torch.cat(xs), torch.cat(zs), torch.cat(deltas))
