"""Tasks that Tamiyo's policies are collected, trained and evaluated on, and one run of one of them.

A task is a Tolaria config (a file under ``configs/`` plus overrides); a size varies the host.
`run_episode` trains one run in-process (``services.mode: off``) with a given controller in
place of the one the config builds, and returns the run's summary, the decisions recorded on
the way (`esper.tamiyo.recording`) and what the reward needs (sample counts).

Tolaria is imported inside the functions: Tolaria imports Tamiyo's policies, and this module
is the one place where Tamiyo drives Tolaria (for collection and benchmarks, never in serving).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


@dataclass(frozen=True)
class Task:
    name: str
    config: str
    overrides: tuple[str, ...]
    # size name -> overrides of the host.
    sizes: dict[str, tuple[str, ...]]


# Tasks from development.yaml pin its epochs (12 when the policy of benchmarks/results was collected).
# The narrow sizes (teacher-mlp w8, digits-cnn1d w4s3: three 4-channel stages) are hosts where
# width growth is what pays, so a collection shows the heuristic's narrow-first rule at work.
TASKS: dict[str, Task] = {
    "digits-mlp": Task("digits-mlp", "development.yaml", ("train.epochs=12",), {
        "w16": ("model.width=16",), "w32": ("model.width=32",), "w32d3": ("model.width=32", "model.depth=3")}),
    "teacher-mlp": Task("teacher-mlp", "development.yaml", (
        "train.epochs=12", "data.name=teacher_student", "data.synthetic_samples=2000"), {
        "w8": ("model.width=8",), "w16": ("model.width=16",), "w32": ("model.width=32",),
        "w32d3": ("model.width=32", "model.depth=3")}),
    "digits-cnn1d": Task("digits-cnn1d", "development.yaml", (
        "train.epochs=12", "model.name=cnn1d", "model.stage_multipliers=[1,2]"), {
        "w4": ("model.width=4",), "w8": ("model.width=8",),
        "w4s3": ("model.width=4", "model.stage_multipliers=[1,1,1]")}),
    # MNIST-1D with a narrow 1D CNN: used as the held-out task (never in the collection); w16 is
    # a second, wider held-out host.
    "mnist1d-cnn1d": Task("mnist1d-cnn1d", "mnist1d.yaml", ("train.epochs=12", "data.train_limit=2000"), {
        "w8": ("model.width=8",), "w16": ("model.width=16",)}),
}

# What every episode sets: in-process controller, no extra sinks, one final checkpoint only.
EPISODE_OVERRIDES = (
    "services.mode=off", "logging.tensorboard=false", "logging.timeline_plot=false", "train.device=cpu",
    "train.torch_threads=1", "checkpoint.keep_last=1", "checkpoint.save_best=false",
)


class TaskError(ValueError):
    """An unknown task or size (names what exists)."""


def task_config(task: str, size: str, seed: int, extra: tuple[str, ...] = ()) -> Any:
    """The Tolaria Config of one episode of `task` at `size` with run seed `seed`."""
    from esper.tolaria.config import load_config

    if task not in TASKS:
        raise TaskError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    t = TASKS[task]
    if size not in t.sizes:
        raise TaskError(f"task {task!r} has no size {size!r}; expected one of {sorted(t.sizes)}")
    overrides = [*t.overrides, *t.sizes[size], *EPISODE_OVERRIDES, f"train.seed={seed}",
                 f"run_name={task}-{size}-s{seed}", *extra]
    cfg = load_config(str(CONFIG_DIR / t.config), overrides)
    cfg.checkpoint.every_epochs = cfg.train.epochs
    return cfg


@dataclass
class Episode:
    summary: dict[str, Any]
    records: list[Any]
    train_samples: int
    val_samples: int
    total_epochs: int


def run_episode(cfg: Any, run_dir: Path, wrap_controller: Callable[[Any], Any] | None = None) -> Episode:
    """Trains one run of `cfg` in `run_dir`; `wrap_controller(controller)` may replace the run's
    controller (e.g. by a `RecordingController` around an exploration policy)."""
    from esper.tolaria.controllers import policy_controller
    from esper.tolaria.trainer import Trainer

    def controller(morph: Any, echo: Callable[[str], None]) -> Any:
        return policy_controller(morph, echo, wrap=wrap_controller)

    trainer = Trainer(cfg, run_dir, morphogenetic=True, progress="none", controller=controller)
    trainer.prepare()
    trainer.start()
    summary = trainer.train()
    records = list(getattr(trainer.morph.controller.inner, "records", []))
    return Episode(summary, records, len(trainer.data.train), len(trainer.data.val), cfg.train.epochs)
