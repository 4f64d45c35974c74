"""The counterfactual measurement and the germination rule inside a real training run."""

from __future__ import annotations

from pathlib import Path

import torch

from esper.kasmina.lifecycle import min_lifecycle_epochs
from esper.tolaria.config import load_config
from esper.tolaria.counterfactual import counterfactual_split
from esper.tolaria.trainer import Trainer

DEV = str(Path(__file__).resolve().parents[2] / "configs" / "development.yaml")
FAST = ["logging.tensorboard=false", "logging.timeline_plot=false", "train.torch_threads=1", "data.train_limit=320",
        "services.mode=off"]


def _trainer(tmp_path: Path, *overrides: str) -> Trainer:
    trainer = Trainer(load_config(DEV, [*FAST, *overrides]), tmp_path / "run", progress="none")
    trainer.prepare()
    return trainer


def test_counterfactual_uses_the_fixed_subset_and_counts_its_flops(tmp_path):
    trainer = _trainer(tmp_path, "lifecycle.counterfactual_samples=50", "lifecycle.refit_steps=3")
    subset = counterfactual_split(trainer.data.val, 50)
    assert len(subset) == 50 and torch.equal(subset.y, trainer.data.val.y[:50])
    assert counterfactual_split(trainer.data.val, 0) is trainer.data.val
    cf = trainer.morph.driver.counterfactual
    before = [p.detach().clone() for p in trainer.model.parameters()]
    flops = trainer.state.growth_flops
    cf.score_with()
    per_sample = trainer.morph.eval_flops_per_sample()
    expected = 3 * 3.0 * per_sample * trainer.config.data.batch_size + per_sample * 50
    assert trainer.state.growth_flops - flops == expected
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


def test_no_germination_that_cannot_finish_before_the_run_ends(tmp_path):
    epochs = 10
    trainer = _trainer(tmp_path, f"train.epochs={epochs}", "controller.max_concurrent=1")
    trainer.start()
    summary = trainer.train()
    spe = trainer.steps_per_epoch
    need = min_lifecycle_epochs(trainer.config.lifecycle, spe)
    assert 1 < need < epochs  # the test needs both allowed and refused germinations
    assert summary["adaptations"], "the controller germinated nothing at all"
    for a in summary["adaptations"]:
        assert epochs - a["epoch"] >= need, a  # germinated at the boundary after epoch a["epoch"]
    refused = trainer.morph.refused
    assert refused and all(r["steps_left"] < need * spe for r in refused)
