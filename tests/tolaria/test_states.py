"""Checkpoint state comes from the trainer's registry of stateful components: a registered
component is saved under its key and restored in order; a checkpoint without one is refused
with a ResumeError naming it. Real trainers on digits, services off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from esper.tolaria import checkpoint as ckpt
from esper.tolaria.config import load_config
from esper.tolaria.governor import Governor, GovernorConfig
from esper.tolaria.states import ResumeError, StateRegistry
from esper.tolaria.trainer import RunState, Trainer

REPO = Path(__file__).resolve().parents[2]
DEV = str(REPO / "configs" / "development.yaml")
FAST = ["logging.tensorboard=false", "logging.timeline_plot=false", "train.torch_threads=1", "services.mode=off"]
# The payload keys checkpoints of esper-train have always had (older checkpoints must still load).
PAYLOAD_KEYS = {"config", "architecture", "model", "seed_manifest", "morph", "optimizer", "optimizer_groups",
                "schedule", "scaler", "governor", "run_state", "params_initial", "input_shape", "num_classes",
                "world_size", "rng"}


class Counter:
    """A stateful component of a test: a number, and the order components were loaded in."""

    def __init__(self, value: int, loads: list[str], name: str) -> None:
        self.value, self.loads, self.name = value, loads, name

    def state_dict(self) -> dict[str, int]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.loads.append(self.name)
        self.value = state["value"]


def test_registered_components_are_saved_and_restored_in_order():
    loads: list[str] = []
    governor, run = Governor(GovernorConfig()), RunState()
    for loss in (1.0, 0.9, 0.8):
        governor.anomaly(loss)
    run.global_step, run.history = 30, [{"val_loss": 0.5}]
    states = StateRegistry()
    states.register("b", Counter(2, loads, "b"))
    states.register("governor", governor, snapshot=True)
    states.register("run_state", run)
    states.register("a", Counter(1, loads, "a"), snapshot=True)
    saved = states.state_dict()
    assert list(saved) == ["b", "governor", "run_state", "a"]
    assert states.state_dict(snapshot=True).keys() == {"governor", "a"}

    states["b"].value, states["a"].value = 20, 10
    governor.anomaly(5.0)
    run.global_step, run.history = 99, []
    states.load_state_dict(saved, source="mem")
    assert (states["b"].value, states["a"].value) == (2, 1) and loads == ["b", "a"]
    assert governor.seen == 3 and run.global_step == 30 and run.history == [{"val_loss": 0.5}]
    with pytest.raises(ValueError, match="registered twice"):
        states.register("a", Counter(0, loads, "again"))


def test_a_missing_component_is_a_resume_error_and_nothing_is_loaded():
    loads: list[str] = []
    states = StateRegistry()
    states.register("first", Counter(1, loads, "first"))
    states.register("second", Counter(2, loads, "second"))
    with pytest.raises(ResumeError) as err:
        states.load_state_dict({"first": {"value": 5}}, source="runs/x/checkpoints/epoch_0002")
    assert str(err.value).startswith("checkpoint 'runs/x/checkpoints/epoch_0002' has no state for ['second']")
    assert loads == [] and states["first"].value == 1


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    out = tmp_path_factory.mktemp("states") / "run"
    cfg = load_config(DEV, ["train.epochs=2", "controller.start_epoch=0", *FAST])
    trainer = Trainer(cfg, out, progress="none")
    trainer.prepare()
    trainer.start()
    trainer.train()
    return cfg, out, trainer


def test_a_checkpoint_holds_every_registered_component(two_epochs):
    cfg, out, trainer = two_epochs
    payload = ckpt.load_checkpoint(ckpt.latest_checkpoint(out))
    assert set(trainer.states.names()) <= PAYLOAD_KEYS <= set(payload)
    resumed = Trainer(cfg, out, progress="none", resume="auto")
    resumed.prepare()
    for key in resumed.states.names():
        if key in ("rng", "optimizer", "model"):
            continue  # tensors: compared below
        assert resumed.states[key].state_dict() == payload[key], key
    assert resumed.state.global_step == trainer.state.global_step
    for name, tensor in resumed.model.state_dict().items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            assert torch.equal(tensor.nan_to_num(), payload["model"][name].nan_to_num()), name
    assert torch.equal(torch.get_rng_state(), payload["rng"]["torch"])


@pytest.mark.parametrize("key", ["governor", "morph"])
def test_a_checkpoint_missing_a_registered_component_is_refused(two_epochs, tmp_path, key):
    cfg, out, _ = two_epochs
    payload = ckpt.load_checkpoint(ckpt.latest_checkpoint(out))
    del payload[key], payload["path"]
    written = ckpt.save_checkpoint(tmp_path / "run", payload["epoch"], payload, keep_last=1)
    trainer = Trainer(cfg, tmp_path / "run", progress="none", resume=str(written))
    with pytest.raises(ResumeError, match=rf"checkpoint '{written}' has no state for \['{key}'\]"):
        trainer.prepare()
