"""Where a width seed grows: a pair of host layers and what lies between them.

A `WidthPair` names a producer (nn.Linear / nn.Conv1d / nn.Conv2d) whose output units are widened,
the optional per-channel norm after it, the activation, an optional per-channel `post` op (max pool,
global mean) and the consumer that reads those units. Host models list their pairs with
`width_pairs()`; names are module names of the *unwrapped* host (`hidden.0`, `layer1.0.conv1`):
`resolve` steps through a `KasminaLayer`'s `.host` so the same names work after `wrap`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

ACTIVATIONS = ("relu",)
POSTS = ("", "maxpool2", "mean")
GROWABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class WidthPair:
    """producer -> [norm] -> activation -> [post] -> consumer, all per-channel between the two."""

    producer: str
    consumer: str
    norm: str = ""
    activation: str = "relu"
    # "maxpool2": 2-wide max pool when every spatial dim is >= 2 (the small CNNs' rule);
    # "mean": global average over the spatial dims (conv features -> linear head).
    post: str = ""

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"WidthPair.activation: {self.activation!r}; expected one of {ACTIVATIONS}")
        if self.post not in POSTS:
            raise ValueError(f"WidthPair.post: {self.post!r}; expected one of {POSTS}")

    @property
    def key(self) -> str:
        """Stable text id of the pair (used in seed specs and checkpoints)."""
        return f"{self.producer}>{self.consumer}"


def _unwrap(module: nn.Module) -> nn.Module:
    # A KasminaLayer keeps the host module as `.host`; growth acts on the host module itself.
    from esper.kasmina.layer import KasminaLayer

    return module.host if isinstance(module, KasminaLayer) else module


def resolve(model: nn.Module, name: str) -> tuple[nn.Module, str, nn.Module]:
    """(parent, attribute, module) of `name` in `model`, stepping into KasminaLayer hosts."""
    parent: nn.Module | None = None
    attr = ""
    current = model
    for part in name.split("."):
        current = _unwrap(current)
        child = current._modules.get(part)
        if child is None:
            raise KeyError(f"model has no submodule {name!r} (no {part!r} under {type(current).__name__})")
        parent, attr, current = current, part, child
    from esper.kasmina.layer import KasminaLayer

    if isinstance(current, KasminaLayer):
        parent, attr, current = current, "host", current.host
    assert parent is not None
    return parent, attr, current


@dataclass
class PairModules:
    """The live modules of a pair (looked up again after every structural change)."""

    producer: nn.Module
    consumer: nn.Module
    norm: nn.Module | None

    @property
    def units(self) -> int:
        """Current width of the pair: the producer's output units."""
        p = self.producer
        return p.out_features if isinstance(p, nn.Linear) else p.out_channels


def pair_modules(model: nn.Module, pair: WidthPair) -> PairModules:
    """Resolves and checks the modules of `pair`; ValueError names what does not fit."""
    _, _, producer = resolve(model, pair.producer)
    _, _, consumer = resolve(model, pair.consumer)
    norm = resolve(model, pair.norm)[2] if pair.norm else None
    for role, mod in (("producer", producer), ("consumer", consumer)):
        if not isinstance(mod, GROWABLE):
            raise ValueError(f"width pair {pair.key}: {role} is {type(mod).__name__}; expected nn.Linear, nn.Conv1d or nn.Conv2d")
        if isinstance(mod, nn.Conv1d | nn.Conv2d) and mod.groups != 1:
            raise ValueError(f"width pair {pair.key}: {role} is a grouped convolution; expected groups=1")
    units = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
    fan = consumer.in_features if isinstance(consumer, nn.Linear) else consumer.in_channels
    if units != fan:
        raise ValueError(f"width pair {pair.key}: producer gives {units} units but consumer reads {fan}; "
                         "expected the consumer to read exactly the producer's units")
    if norm is not None and (not isinstance(norm, NORMS) or norm.num_features != units):
        raise ValueError(f"width pair {pair.key}: norm must be a BatchNorm over {units} channels, got {norm}")
    return PairModules(producer, consumer, norm)
