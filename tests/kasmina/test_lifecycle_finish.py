"""No germination whose lifecycle cannot finish: the bound, and that it is exact on the fast path."""

from __future__ import annotations

import torch
from torch import nn

from esper.kasmina import LifecycleConfig, LifecycleDriver, wrap
from esper.kasmina.lifecycle import AlignmentWindow, min_lifecycle_epochs
from esper.lifecycle import SeedLifecycleState as S


def test_min_lifecycle_epochs():
    cfg = LifecycleConfig(training_min_steps=100, grafting_steps=100, stabilization_steps=20,
                          evaluation_epochs=1, fine_tuning_epochs=2)
    assert min_lifecycle_epochs(cfg, 50) == 5 + 0 + 2
    assert min_lifecycle_epochs(cfg, 220) == 1 + 0 + 2
    assert min_lifecycle_epochs(LifecycleConfig(training_min_steps=10, grafting_steps=10, stabilization_steps=0,
                                                evaluation_epochs=3, fine_tuning_epochs=0), 100) == 1 + 2 + 1


def test_a_seed_on_the_fastest_path_reaches_its_verdict_exactly_in_the_bound():
    """Drive a real layer through the fastest legal path: the verdict lands at the last boundary."""
    cfg = LifecycleConfig(training_min_steps=6, gate_interval_steps=1, min_alignment=-1.0, grafting_steps=5,
                          stabilization_steps=3, evaluation_epochs=1, fine_tuning_epochs=2)
    spe = 4
    epochs = min_lifecycle_epochs(cfg, spe)
    model = wrap(nn.Sequential(nn.Linear(3, 4)), ["0"])
    scores = iter([1.0, 0.0] * 10)  # baseline, then seed disabled: contribution +1 every time
    driver = LifecycleDriver(model, cfg, evaluate=lambda: next(scores))
    layer = driver.site("0")
    assert driver.can_finish(epochs * spe, spe) and not driver.can_finish(epochs * spe - 1, spe)
    layer.germinate(0, "residual_mlp")
    layer.read_alignment = lambda i: AlignmentWindow(-1.0, 1.0, 1.0)  # always aligned: the fastest gate
    x = torch.randn(2, 3)
    for _epoch in range(epochs):
        assert layer.state_of(0) != S.FOSSILIZED
        for _ in range(spe):
            model(x).sum().backward()
            driver.step()
        driver.end_epoch()
    assert layer.state_of(0) == S.FOSSILIZED
