"""Morphogenesis counts FLOPs per sample again only when the model's structure changes.

Real training runs (width growth that merges, branch seeds that are culled); at every lifecycle
event and epoch end the cached count must equal a fresh counting pass, a germination, merge or
cull must trigger a recount, and a transition between two running states must not.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import esper.tolaria.morphogenesis as morphogenesis
from esper.kasmina.lifecycle import ACTIVE_STATES
from esper.tolaria.config import load_config
from esper.tolaria.hooks import BoundaryHook
from esper.tolaria.hosts import forward_flops_per_sample
from esper.tolaria.trainer import Trainer

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "development.yaml")
NARROW = [
    "data.name=teacher_student", "data.synthetic_samples=1200", "data.batch_size=64",
    "model.name=mlp", "model.width=4", "model.depth=1",
    "optim.name=adamw", "optim.lr=0.003", "train.epochs=6", "train.torch_threads=1",
    "lifecycle.training_min_steps=10", "lifecycle.gate_interval_steps=5", "lifecycle.min_alignment=0.0",
    "lifecycle.grafting_steps=10", "lifecycle.stabilization_steps=2", "lifecycle.evaluation_epochs=1",
    "lifecycle.fine_tuning_epochs=1", "controller.grow_without_plateau=true", "controller.cooldown_epochs=0",
    "services.mode=off", "logging.tensorboard=false", "logging.timeline_plot=false",
    "checkpoint.every_epochs=1000",
]


def _run_checking_the_cache(tmp_path: Path, monkeypatch, overrides: list[str]):
    """Trains, checking the cache at every event and epoch end; returns (events, recounts per event)."""
    recounts = []

    def counting(model, input_shape, device):
        recounts.append(1)
        return forward_flops_per_sample(model, input_shape, device)

    monkeypatch.setattr(morphogenesis, "forward_flops_per_sample", counting)
    checked = []

    class EpochCheck(BoundaryHook):
        def after_epoch(self, trainer, epoch, record):
            check(("epoch", epoch))
            return False

    trainer = Trainer(load_config(CONFIG, [*NARROW, *overrides]), tmp_path / "run", progress="none",
                      hooks=[EpochCheck()])
    trainer.prepare()
    trainer.start()
    morph = trainer.morph

    def check(label):
        before = len(recounts)
        cached = morph.eval_flops_per_sample()
        fresh = forward_flops_per_sample(trainer.model, morph.input_shape, trainer.device)
        assert cached == fresh, (label, cached, fresh)
        assert morph.train_flops_per_sample() == fresh
        checked.append((label, len(recounts) - before, cached))

    morph.driver.add_listener(lambda e: check((e.from_state, e.to_state, e.reason)))
    summary = trainer.train()
    return summary, checked


@pytest.mark.integration
def test_width_growth_and_merge_recount_only_on_structure_changes(tmp_path, monkeypatch):
    summary, checked = _run_checking_the_cache(
        tmp_path, monkeypatch, ["growth.modes=[width]", "growth.width_units=4", "growth.width_lifecycle=full", "controller.max_adaptations=1",
                                "lifecycle.min_contribution=-1.0"])
    transitions = {(label[0].name, label[1].name): n for label, n, _ in checked if label[0] != "epoch"}
    assert ("FOSSILIZED", "DORMANT") in transitions, "the width seed was never merged"
    assert transitions[("GERMINATED", "TRAINING")] == 1   # the seed's units now run
    assert transitions[("FOSSILIZED", "DORMANT")] == 1    # merged: a wider host, no seed
    for (a, b), n in transitions.items():
        if a in {s.name for s in ACTIVE_STATES} and b in {s.name for s in ACTIVE_STATES}:
            assert n == 0, (a, b)                          # e.g. TRAINING -> GRAFTING: same structure
    assert summary["flops"]["forward_per_sample_final"] > 0


@pytest.mark.integration
def test_culled_branch_seeds_invalidate_the_cached_count(tmp_path, monkeypatch):
    # A contribution above 1 (accuracy points as a fraction) is never reached: every seed is culled.
    summary, checked = _run_checking_the_cache(
        tmp_path, monkeypatch, ["growth.modes=[branch]", "lifecycle.min_contribution=2.0",
                                "controller.max_adaptations=2"])
    # Each cull drops the seed's FLOPs from the (checked fresh) count; back to the bare host no
    # counting pass is needed at all.
    counts = [(label, value) for label, _, value in checked]
    culls = [i for i, (label, _) in enumerate(counts) if label[0] != "epoch" and label[1].name == "CULLED"]
    assert culls
    for i in culls:
        assert counts[i][1] < counts[i - 1][1], counts[i - 1 : i + 1]
    states = [label for label, _ in counts if label[0] != "epoch"]
    assert any(b.name == "GRAFTING" for _, b, _ in states), "no seed got past TRAINING"
    assert summary["flops"]["forward_per_sample_final"] == forward_flops_per_sample(
        _fresh_host(tmp_path), (32,), torch.device("cpu"))


def _fresh_host(tmp_path: Path):
    """The run's host as built, every seed culled: what a fully culled run computes per sample."""
    trainer = Trainer(load_config(CONFIG, NARROW), tmp_path / "fresh", progress="none")
    trainer.prepare()
    return trainer.model
