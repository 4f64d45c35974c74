"""Running a width seed inside the host: its input is the producer's, its output joins the consumer's.

`WidthHooks` puts a forward pre-hook on the producer (remembers its input) and a forward hook on
the consumer (adds the seed's output). `blend` decides how: `full_strength` adds it as is (line
search, tests, immediate growth); `esper.kasmina.growth.lifecycle` blends it by the lifecycle state
and alpha of the Kasmina slot that owns the seed. Hooks are re-installed after any structural
change of the host (`install` resolves the modules again).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from esper.kasmina.growth.pair import WidthPair, pair_modules
from esper.kasmina.growth.seed import WidthSeed

Blend = Callable[[torch.Tensor, torch.Tensor, WidthSeed], torch.Tensor]


def full_strength(out: torch.Tensor, x: torch.Tensor, seed: WidthSeed) -> torch.Tensor:
    """The consumer output plus the seed's output (no lifecycle)."""
    return out + seed(x)


class WidthHooks:
    """Forward hooks that run `seed` between the modules of `pair` in `model`."""

    def __init__(self, model: nn.Module, pair: WidthPair, seed: WidthSeed, blend: Blend = full_strength) -> None:
        self.model = model
        self.pair = pair
        self.seed = seed
        self.blend = blend
        self._x: torch.Tensor | None = None
        self._handles: list = []

    def install(self) -> None:
        """(Re)attaches to the pair's current modules."""
        self.remove()
        mods = pair_modules(self.model, self.pair)
        self._handles = [mods.producer.register_forward_pre_hook(self._remember),
                         mods.consumer.register_forward_hook(self._add)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._x = None

    def _remember(self, module, args) -> None:
        self._x = args[0]

    def _add(self, module, args, out):
        x, self._x = self._x, None
        if x is None:
            return out
        if self.seed.training != module.training:
            self.seed.train(module.training)  # its norm must follow the host's train/eval mode
        return self.blend(out, x, self.seed)


@contextlib.contextmanager
def attached(model: nn.Module, pair: WidthPair, seed: WidthSeed) -> Iterator[WidthHooks]:
    """The seed runs at full strength inside the block."""
    hooks = WidthHooks(model, pair, seed)
    hooks.install()
    try:
        yield hooks
    finally:
        hooks.remove()
