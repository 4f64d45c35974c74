"""The refit counterfactual: it tracks a seed's real gain where the plain alpha=0 one does not.

Two real trainings on an XOR task, each measured three ways on the same trained weights:
- real gain: accuracy of host+seed trained together minus the same host trained alone;
- plain counterfactual: accuracy with the seed minus with its alpha forced to 0;
- refit counterfactual (what the driver uses): both sides after the same short host refit.

Useful seed: the host is linear (cannot solve XOR), the seed adds a ReLU MLP: real gain is large.
Co-adapted seed: the host is a ReLU MLP that solves XOR alone; the seed is a full-rank linear map
on its pre-activations, so it adds nothing the host lacks, yet the host trains in the seed's
basis and the plain counterfactual credits the seed with that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from esper.kasmina import LifecycleConfig, LifecycleDriver, wrap
from esper.kasmina.counterfactual import RefitCounterfactual
from esper.lifecycle import SeedLifecycleState as S


def _xor(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]])
    which = torch.randint(0, 4, (n,), generator=g)
    x = centers[which] + 0.35 * torch.randn(n, 2, generator=g)
    return x, (which >= 2).long()


class Host(nn.Module):
    def __init__(self, hidden: int, relu: bool) -> None:
        super().__init__()
        self.h = nn.Linear(2, hidden)
        self.act = nn.ReLU() if relu else nn.Identity()
        self.head = nn.Linear(hidden, 2)

    def forward(self, x):
        return self.head(self.act(self.h(x)))


def _accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    model.train()
    return acc


def _train(model: nn.Module, opt, x, y, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def _measure(hidden: int, relu: bool, seed_module: nn.Module, steps: int = 300) -> dict[str, float]:
    x, y = _xor(1024, 0)
    xv, yv = _xor(1024, 1)
    torch.manual_seed(0)
    alone = Host(hidden, relu)
    torch.manual_seed(0)
    model = wrap(Host(hidden, relu), ["h"])
    _train(alone, torch.optim.Adam(alone.parameters(), lr=0.02), x, y, steps, 2)

    driver = LifecycleDriver(model, LifecycleConfig(fine_tuning_epochs=5))
    layer = driver.site("h")
    layer.germinate(0, "residual_mlp", module=seed_module)
    for state in (S.GRAFTING, S.STABILIZATION, S.EVALUATING, S.FINE_TUNING):
        layer.transition(0, state, "test: straight to a blended, trainable seed")
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    _train(model, opt, x, y, steps, 2)

    with_seed = _accuracy(model, xv, yv)
    with layer.seed_disabled(0):
        without = _accuracy(model, xv, yv)
    def refit_step(k: int) -> None:
        idx = torch.randint(0, x.shape[0], (64,), generator=torch.Generator().manual_seed(100 + k))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    driver.counterfactual = RefitCounterfactual(model, lambda: _accuracy(model, xv, yv), refit_step, 20, opt)
    driver.end_epoch()
    after = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    for k, v in before.items():
        if k.endswith("table.contribution") or k.endswith("epochs_in_state") or k.endswith("table.state") \
                or k.endswith("steps_in_state"):
            continue
        assert torch.equal(v, after[k]), f"{k} changed by the measurement"
    return {"real": with_seed - _accuracy(alone, xv, yv), "plain": with_seed - without,
            "refit": float(layer.table.contribution[0])}


def test_refit_counterfactual_tracks_the_real_gain():
    torch.manual_seed(4)
    useful = _measure(8, relu=False, seed_module=nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8)))
    torch.manual_seed(5)
    linear = nn.Linear(16, 16)
    with torch.no_grad():
        linear.weight.copy_(2.0 * torch.linalg.qr(torch.randn(16, 16))[0])
    coadapted = _measure(16, relu=True, seed_module=linear)

    assert useful["real"] > 0.25, useful  # the linear host cannot do XOR; the seed makes it
    assert abs(coadapted["real"]) < 0.05, coadapted  # the ReLU host solves it alone
    assert coadapted["plain"] > 0.15, coadapted  # the plain measure credits co-adaptation
    # The refit measure credits the co-adapted seed with about its real (zero) gain, much closer
    # to it than the plain measure, and still credits the useful seed with a large gain.
    assert abs(coadapted["refit"] - coadapted["real"]) < 0.1, coadapted
    assert abs(coadapted["refit"] - coadapted["real"]) < abs(coadapted["plain"] - coadapted["real"]) - 0.1
    assert useful["refit"] > 0.25, useful
    assert useful["refit"] > coadapted["refit"] + 0.2, (useful, coadapted)


def test_refit_restores_parameters_buffers_and_optimizer_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    _train(model, opt, x, y, 5, 0)
    params = [p.detach().clone() for p in model.parameters()]
    running = model[1].running_mean.clone()
    exp_avg = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    seen = []

    def step(k: int) -> None:
        seen.append(k)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    cf = RefitCounterfactual(model, lambda: 0.0, step, 3, opt)
    with cf.refitted():
        assert not torch.equal(params[0], model[0].weight)  # the refit did train
    assert seen == [0, 1, 2]
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert torch.equal(running, model[1].running_mean)
    assert all(torch.equal(a, opt.state[p]["exp_avg"]) for a, p in zip(exp_avg, model.parameters(), strict=True))


def test_refit_needs_a_train_step():
    import pytest

    with pytest.raises(ValueError, match="train_step"):
        RefitCounterfactual(nn.Linear(2, 2), lambda: 0.0, None, 3)
