"""The trainer's collaborators are given to its constructor: the controller factory builds the
controller Morphogenesis uses (germinations and grace epochs go through it) and the hooks run after
it, in order. Real training steps on digits, services off."""

from __future__ import annotations

from pathlib import Path

from esper.lifecycle import SeedLifecycleState as S
from esper.tolaria.config import load_config
from esper.tolaria.controllers import PolicyController, policy_controller
from esper.tolaria.hooks import BoundaryHook
from esper.tolaria.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
DEV = str(REPO / "configs" / "development.yaml")
FAST = ["logging.tensorboard=false", "logging.timeline_plot=false", "train.torch_threads=1", "services.mode=off"]


class CountingController(PolicyController):
    """The in-process policy, counting what Morphogenesis and the trainer ask of it."""

    def __init__(self, inner, calls: list[str]) -> None:
        super().__init__(inner)
        self.calls = calls

    def germinate(self, layer, decision) -> None:
        self.calls.append(f"germinate {layer.layer_name}[{decision.seed_index}]")
        super().germinate(layer, decision)

    def germination_grace(self, layer: str, seed: int) -> int:
        self.calls.append(f"grace {layer}[{seed}]")
        return 0

    def after_epoch(self, trainer, epoch, record) -> bool:
        self.calls.append(f"controller after_epoch {epoch}")
        return False


class EpochProbe(BoundaryHook):
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def after_epoch(self, trainer, epoch, record) -> bool:
        self.calls.append(f"probe after_epoch {epoch}")
        return False


def test_the_injected_controller_decides_germinates_and_runs_first(tmp_path):
    calls: list[str] = []
    built = []

    def factory(morph, echo):
        controller = CountingController(policy_controller(morph, echo).inner, calls)
        built.append((morph, controller))
        return controller

    cfg = load_config(DEV, ["train.epochs=4", "controller.start_epoch=0", "controller.grow_without_plateau=true",
                            *FAST])
    probe = EpochProbe(calls)
    trainer = Trainer(cfg, tmp_path / "run", progress="none", controller=factory, hooks=[probe])
    trainer.prepare()
    [(morph, controller)] = built
    assert morph is trainer.morph and trainer.morph.controller is controller
    assert trainer.hooks == [controller, probe]  # the controller first, then the given hooks in order
    trainer.start()
    summary = trainer.train()
    germinated = [c for c in calls if c.startswith("germinate ")]
    assert germinated and len(germinated) == len(summary["adaptations"])
    assert germinated == [f"germinate {a['layer']}[{a['seed']}]" for a in summary["adaptations"]]
    epochs = [c for c in calls if "after_epoch" in c]
    assert epochs == [f"{who} after_epoch {e}" for e in range(4) for who in ("controller", "probe")]


def test_the_driver_asks_the_controller_for_grace_epochs(tmp_path):
    calls: list[str] = []
    cfg = load_config(DEV, ["train.epochs=2", "lifecycle.germination_timeout_epochs=1", *FAST])
    trainer = Trainer(cfg, tmp_path / "run", progress="none",
                      controller=lambda morph, echo: CountingController(policy_controller(morph).inner, calls))
    trainer.prepare()
    name, layer = trainer.morph.driver.sites[0]
    layer.germinate(0, "residual_mlp", await_kernel=True)  # waits for a kernel that never comes
    trainer.morph.driver.end_epoch()
    assert calls == [f"grace {name}[0]"]
    cancelled = [e for e in trainer.morph.driver.events if e.to_state == S.CANCELLED]
    assert [e.reason for e in cancelled] == ["no kernel arrived within 1 epoch(s)"]  # no grace from it
