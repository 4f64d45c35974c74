"""Esper: morphogenetic training. Grow seeds inside a host network while it trains.

Subsystems: `esper.kasmina` (seeds in the model), `esper.tolaria` (training), `esper.tamiyo`
(controller), `esper.urza` (library), `esper.tezzeret` (compiler), `esper.oona` (bus).
Contracts are the protobuf messages in `esper.v1`.
"""

from esper.lifecycle import SeedLifecycleState

__version__ = "0.1.0"
__all__ = ["SeedLifecycleState", "__version__", "load_extension"]


def load_extension():
    """Import and return the compiled `esper._C` module (registers the `torch.ops.esper` ops)."""
    from esper._extension import load

    module = load()
    import esper.kasmina.ops  # noqa: F401  (fake kernels and autograd for the ops)

    return module
