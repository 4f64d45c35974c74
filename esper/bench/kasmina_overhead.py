"""What seed sites cost in a training step: dormant (should be ~free) and active (vs hand-written).

`figures(quick, device)` returns:

- `dormant_overhead_{mlp,cnn,resnet18}`: median training-step time of the model with every seed
  site wrapped and every slot DORMANT (LifecycleDriver.step() included) / the plain model's.
  Target <= 1.01.
- `active_overhead_{mlp,cnn,resnet18}`: one seed per site in FINE_TUNING (alpha 1, host and seed
  training, telemetry on) / the plain model with the same seed modules called by hand
  (`h + s` written with torch.cat), i.e. the cost of the Kasmina machinery around the seed.
- `dormant_wrapper_us`: extra time of one forward call through a dormant KasminaLayer (wrapping a
  tiny Linear, so the wrapper's own Python cost dominates), in microseconds; the dormant backward
  adds nothing (no autograd node). Multiply by the sites of a model to bound its dormant overhead.
- `*_plain_ms`: the plain model's median step time, for scale; `resnet18_width`: the ResNet's base
  width (64 in the full run; 8 when quick, so a CPU-only quick run stays short).

Batch 128 of 32x32 RGB inputs, SGD with momentum. On CPU the step cost is the process CPU time
with one intra-op thread (robust on a shared machine); on CUDA it is synchronised wall time. Each round times the baseline and the candidate
back to back (order alternating), so machine load affects both alike; a figure is the median of
the per-round ratios. Run: `python -m esper.bench.kasmina_overhead`.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import esper.kasmina as K
from esper.lifecycle import SeedLifecycleState as S
from esper.models import MLP, SmallCNN2d, resnet18_cifar

BATCH = 128
SEEDS_PER_LAYER = 4


class _HandBlend(nn.Module):
    """Baseline for the active path: host output plus a seed on its first chunk, written by hand."""

    def __init__(self, host: nn.Module, seed: nn.Module, chunk: int) -> None:
        super().__init__()
        self.host = host
        self.seed = seed
        self.chunk = chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.host(x)
        c = self.chunk
        return torch.cat([h[:, :c] + self.seed(h[:, :c]), h[:, c:]], dim=1)


def _models(quick: bool) -> dict[str, tuple[Callable[[], nn.Module], list[str], str]]:
    resnet_width = 8 if quick else 64
    return {
        "mlp": (lambda: MLP(3 * 32 * 32, 512, 10, depth=3), ["hidden.0", "hidden.1", "hidden.2"], "residual_mlp"),
        "cnn": (lambda: SmallCNN2d(3, 10, channels=(32, 64, 128)), ["convs.0", "convs.1", "convs.2"], "conv3x3"),
        "resnet18": (
            lambda: resnet18_cifar(10, width=resnet_width),
            [f"layer{s}.{j}" for s in range(1, 5) for j in range(2)],
            "conv3x3",
        ),
    }


def _step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, after: Callable[[], None] | None):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if after is not None:
            after()

    return step


def _time(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds per step: CUDA wall time after a sync; on CPU the process's CPU time.

    CPU time (with one intra-op thread, see figures) is what the step costs this process; wall
    time on a shared CPU mostly measures the other processes.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / steps
    start = time.process_time()
    for _ in range(steps):
        step()
    return (time.process_time() - start) / steps


def _ratio(baseline: Callable[[], None], candidate: Callable[[], None], rounds: int, steps: int,
           device: torch.device) -> tuple[float, float]:
    """Median over rounds of (candidate time / baseline time), each round timing both back to back.

    Pairing the two measurements of a round cancels slow drifts of machine load; the order
    alternates between rounds so neither side always runs on a warmer cache.
    """
    for fn in (baseline, candidate):  # warm-up (allocator, lazy init, autotuning)
        _time(fn, 1, device)
    ratios, base = [], []
    for r in range(rounds):
        if r % 2 == 0:
            b = _time(baseline, steps, device)
            c = _time(candidate, steps, device)
        else:
            c = _time(candidate, steps, device)
            b = _time(baseline, steps, device)
        ratios.append(c / b)
        base.append(b)
    return statistics.median(ratios), statistics.median(base)


def figures(quick: bool = True, device: str = "cpu") -> dict[str, float]:
    """Dormant and active overhead ratios for the MLP, small CNN and CIFAR ResNet-18 (see module doc)."""
    dev = torch.device(device)
    rounds, steps = (5, 1) if quick else (21, 3)
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(1)
    try:
        return _figures(quick, dev, rounds, steps)
    finally:
        torch.set_num_threads(threads)


def _wrapper_us(dev: torch.device, calls: int) -> float:
    plain = nn.Linear(4, 4).to(dev)
    wrapped = K.KasminaLayer(copy.deepcopy(plain), num_seeds=2, name="probe")
    x = torch.randn(2, 4, device=dev)
    samples = []
    with torch.no_grad():
        for _ in range(7):
            pair = []
            for module in (plain, wrapped):
                start = time.perf_counter()
                for _ in range(calls):
                    module(x)
                pair.append(time.perf_counter() - start)
            samples.append((pair[1] - pair[0]) / calls * 1e6)
    return statistics.median(samples)


def _figures(quick: bool, dev: torch.device, rounds: int, steps: int) -> dict[str, float]:
    out: dict[str, float] = {"resnet18_width": 8.0 if quick else 64.0}
    out["dormant_wrapper_us"] = _wrapper_us(dev, 2000 if quick else 20000)
    torch.manual_seed(0)
    x = torch.randn(BATCH, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (BATCH,), device=dev)
    for name, (make, sites, blueprint) in _models(quick).items():
        plain = make().to(dev)
        wrapped = K.wrap(copy.deepcopy(plain), sites, seeds_per_layer=SEEDS_PER_LAYER)
        driver = K.LifecycleDriver(wrapped, K.LifecycleConfig())
        ratio, plain_s = _ratio(_step_fn(plain, x, y, None), _step_fn(wrapped, x, y, driver.step), rounds, steps, dev)
        out[f"dormant_overhead_{name}"] = ratio
        out[f"{name}_plain_ms"] = plain_s * 1e3

        # Active: one seed per site, fully blended and training (FINE_TUNING), against the same
        # seed modules (same weights) called by hand on the plain model.
        active = K.wrap(copy.deepcopy(plain), sites, seeds_per_layer=SEEDS_PER_LAYER)
        hand = copy.deepcopy(plain)
        for site, layer in K.seed_sites(active):
            layer.germinate(0, blueprint)
            for to in (S.GRAFTING, S.STABILIZATION, S.EVALUATING, S.FINE_TUNING):
                layer.transition(0, to, "benchmark")
            parent_name, _, attr = site.rpartition(".")
            parent = hand.get_submodule(parent_name) if parent_name else hand
            seed = copy.deepcopy(layer.seeds["0"])
            setattr(parent, attr, _HandBlend(parent.get_submodule(attr), seed, layer.chunk_size))
        active_driver = K.LifecycleDriver(active, K.LifecycleConfig(fine_tuning_epochs=10**6))
        ratio, _ = _ratio(_step_fn(hand, x, y, None), _step_fn(active, x, y, active_driver.step), rounds, steps, dev)
        out[f"active_overhead_{name}"] = ratio
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="more rounds; ResNet-18 at width 64")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(json.dumps(figures(quick=not args.full, device=args.device), indent=2))


if __name__ == "__main__":
    main()
