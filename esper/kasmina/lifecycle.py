"""Seed lifecycle: the transition table, gate rules on measured signals, config and events.

States come from `esper.lifecycle.SeedLifecycleState` (mirror of the proto enum). The main path is

    DORMANT -> GERMINATED -> TRAINING -> GRAFTING -> STABILIZATION -> EVALUATING -> FINE_TUNING -> FOSSILIZED

with CULLED (from TRAINING..FINE_TUNING; the slot is embargoed `embargo_epochs` epochs, then
DORMANT), CANCELLED (before any host impact: from GERMINATED or TRAINING; then DORMANT) and
ROLLED_BACK (the governor restored a snapshot; from GERMINATED..FINE_TUNING; then DORMANT).
`check_transition` raises `IllegalTransitionError` for anything else.

Gates are pure functions of measured signals; `esper.kasmina.driver.LifecycleDriver` measures
the signals and calls them at step and epoch boundaries:

- TRAINING -> GRAFTING: at least `training_min_steps` steps and the seed's gradient alignment
  (cosine between the seed's output and the descent direction -dL/dh on its chunk, accumulated
  over the last window of steps) reached `min_alignment`: blending the seed in is predicted, to
  first order, to lower the task loss. Still below after `training_max_steps`: CULLED.
- GRAFTING -> STABILIZATION: alpha ramped to 1 over `grafting_steps` steps.
- STABILIZATION -> EVALUATING: `stabilization_steps` steps with the seed frozen.
- EVALUATING -> FINE_TUNING / CULLED: after `evaluation_epochs` epochs, the counterfactual
  contribution (validation score with the seed minus with its alpha forced to 0) must exceed
  `min_contribution` (default 0: the seed must measurably help), else culled. A seed that changes
  nothing is culled, not kept: it would cost parameters and compute for no gain.
- FINE_TUNING -> FOSSILIZED / CULLED: the contribution is re-measured every epoch; it must stay
  above `min_contribution` for `fine_tuning_epochs` epochs.
- GERMINATED -> CANCELLED: no kernel arrived within `germination_timeout_epochs` epochs (0, the
  default: no limit in epochs; whoever awaits the kernel cancels, e.g. on a wall-clock timeout).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from esper.lifecycle import SeedLifecycleState as S
from esper.v1 import common_pb2

ACTIVE_STATES = frozenset({S.TRAINING, S.GRAFTING, S.STABILIZATION, S.EVALUATING, S.FINE_TUNING, S.FOSSILIZED})
"""States in which the seed module runs in the forward pass."""

BLENDED_STATES = frozenset({S.GRAFTING, S.STABILIZATION, S.EVALUATING, S.FINE_TUNING, S.FOSSILIZED})
"""States in which the seed's output reaches the host output (weighted by alpha)."""

FROZEN_STATES = frozenset({S.STABILIZATION, S.EVALUATING})
"""States in which the seed runs without gradients (its parameters do not train)."""

CULLABLE_STATES = frozenset({S.TRAINING, S.GRAFTING, S.STABILIZATION, S.EVALUATING, S.FINE_TUNING})
ROLLBACKABLE_STATES = CULLABLE_STATES | {S.GERMINATED}

TRANSITIONS: dict[S, frozenset[S]] = {
    S.UNSPECIFIED: frozenset(),
    S.DORMANT: frozenset({S.GERMINATED}),
    S.GERMINATED: frozenset({S.TRAINING, S.CANCELLED, S.ROLLED_BACK}),
    S.TRAINING: frozenset({S.GRAFTING, S.CULLED, S.CANCELLED, S.ROLLED_BACK}),
    S.GRAFTING: frozenset({S.STABILIZATION, S.CULLED, S.ROLLED_BACK}),
    S.STABILIZATION: frozenset({S.EVALUATING, S.CULLED, S.ROLLED_BACK}),
    S.EVALUATING: frozenset({S.FINE_TUNING, S.CULLED, S.ROLLED_BACK}),
    S.FINE_TUNING: frozenset({S.FOSSILIZED, S.CULLED, S.ROLLED_BACK}),
    S.FOSSILIZED: frozenset(),
    S.CULLED: frozenset({S.DORMANT}),
    S.CANCELLED: frozenset({S.DORMANT}),
    S.ROLLED_BACK: frozenset({S.DORMANT}),
}
"""Legal transitions: TRANSITIONS[from] is the set of states `from` may move to."""

class IllegalTransitionError(RuntimeError):
    """A transition that the lifecycle table does not allow; names both states (and the seed)."""

    def __init__(self, from_state: S, to_state: S, where: str = "") -> None:
        self.from_state = S(from_state)
        self.to_state = S(to_state)
        allowed = ", ".join(s.name for s in sorted(TRANSITIONS[self.from_state])) or "none (terminal)"
        prefix = f"{where}: " if where else ""
        super().__init__(
            f"{prefix}illegal seed transition {self.from_state.name} -> {self.to_state.name}; "
            f"from {self.from_state.name} the allowed targets are: {allowed}"
        )


def check_transition(from_state: S, to_state: S, where: str = "") -> None:
    """Raise IllegalTransitionError unless `from_state -> to_state` is in TRANSITIONS."""
    if S(to_state) not in TRANSITIONS[S(from_state)]:
        raise IllegalTransitionError(from_state, to_state, where)


@dataclass
class LifecycleConfig:
    """Gate thresholds and durations (steps are optimizer steps, epochs are epoch boundaries).

    The one definition: Tolaria's ``lifecycle`` config section is this type.
    """

    # TRAINING -> GRAFTING after at least this many steps once the seed's output aligns with the
    # descent direction (cosine >= min_alignment); CULLED if still unaligned after the max.
    training_min_steps: int = 50
    training_max_steps: int = 400
    gate_interval_steps: int = 10
    min_alignment: float = 0.02
    grafting_steps: int = 50
    stabilization_steps: int = 20
    evaluation_epochs: int = 1
    fine_tuning_epochs: int = 1
    # Counterfactual contribution (validation score with the seed minus with alpha=0) a seed must
    # exceed to be fossilized; 0 means it must be positive.
    min_contribution: float = 0.0
    # Per-site thresholds that replace min_contribution at that site, e.g. {hidden.1: 0.01}.
    min_contribution_per_site: dict[str, float] = field(default_factory=dict)
    embargo_epochs: int = 2
    # Cancel a seed still waiting for its kernel after this many epochs; 0: no limit in epochs
    # (whoever awaits the kernel cancels it, e.g. Tolaria after services.germination_timeout_s
    # seconds: epochs of a small model can be far shorter than a compile).
    germination_timeout_epochs: int = 0
    dead_threshold: float = 0.0
    # Counterfactual measurement (esper.kasmina.counterfactual): on the first N validation samples
    # (a fixed subset; 0 = the whole split), each side after `refit_steps` host training steps at
    # the base learning rate, so that co-adaptation of the host is not credited to the seed
    # (0 = the plain alpha=0 counterfactual). Its compute counts as growth overhead.
    counterfactual_samples: int = 256
    refit_steps: int = 5

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """ValueError naming the field (``LifecycleConfig.<field>``) when a value is out of range."""
        positive = ("training_min_steps", "gate_interval_steps", "grafting_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"LifecycleConfig.{name} must be >= 1, got {getattr(self, name)}")
        non_negative = ("stabilization_steps", "evaluation_epochs", "fine_tuning_epochs", "embargo_epochs",
                        "counterfactual_samples", "refit_steps")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"LifecycleConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.training_max_steps < self.training_min_steps:
            raise ValueError(
                f"LifecycleConfig.training_max_steps ({self.training_max_steps}) must be >= "
                f"training_min_steps ({self.training_min_steps})"
            )
        if self.germination_timeout_epochs < 0:
            raise ValueError(
                f"LifecycleConfig.germination_timeout_epochs must be >= 0 (0: no limit), got "
                f"{self.germination_timeout_epochs}"
            )
        if not -1.0 <= self.min_alignment <= 1.0:
            raise ValueError(f"LifecycleConfig.min_alignment is a cosine in [-1, 1], got {self.min_alignment}")

    @property
    def alpha_step(self) -> float:
        """Alpha increment per step while GRAFTING."""
        return 1.0 / self.grafting_steps

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LifecycleEvent:
    """One transition of one seed; emitted to listeners on every transition."""

    layer: str
    seed: int
    from_state: S
    to_state: S
    step: int
    epoch: int
    reason: str

    def to_proto(self, run_id: str = "") -> common_pb2.LifecycleEvent:
        event = common_pb2.LifecycleEvent(
            run_id=run_id,
            layer_name=self.layer,
            seed_index=self.seed,
            from_state=int(self.from_state),
            to_state=int(self.to_state),
            global_step=self.step,
            epoch=self.epoch,
            reason=self.reason,
        )
        event.create_time.GetCurrentTime()
        return event


LifecycleListener = Callable[[LifecycleEvent], None]


@dataclass(frozen=True)
class GateDecision:
    """A gate's verdict: move to `to_state` for `reason`."""

    to_state: S
    reason: str


@dataclass(frozen=True)
class AlignmentWindow:
    """Gradient alignment of one seed over a window of TRAINING steps.

    grad_dot_seed = sum <dL/dh, s>, grad_sq = sum |dL/dh|^2, seed_sq = sum |s|^2 over the window.
    """

    grad_dot_seed: float
    grad_sq: float
    seed_sq: float

    @property
    def cosine(self) -> float:
        """cos(s, -dL/dh): > 0 means adding the seed's output lowers the loss to first order."""
        denom = math.sqrt(self.grad_sq * self.seed_sq)
        if denom == 0.0 or not math.isfinite(denom):
            return 0.0
        return -self.grad_dot_seed / denom


def training_gate(steps_in_state: int, window: AlignmentWindow, cfg: LifecycleConfig) -> GateDecision | None:
    """TRAINING -> GRAFTING once aligned after the minimum steps; CULLED after max steps without."""
    cos = window.cosine
    if steps_in_state >= cfg.training_min_steps and cos >= cfg.min_alignment and window.grad_dot_seed < 0:
        return GateDecision(
            S.GRAFTING,
            f"seed aligned with the descent direction: cosine {cos:.4f} >= {cfg.min_alignment} "
            f"after {steps_in_state} steps",
        )
    if steps_in_state >= cfg.training_max_steps:
        return GateDecision(
            S.CULLED,
            f"seed never aligned with the task gradient: cosine {cos:.4f} < {cfg.min_alignment} "
            f"after {steps_in_state} steps",
        )
    return None


def step_gate(state: S, steps_in_state: int, cfg: LifecycleConfig) -> GateDecision | None:
    """Step-count gates: GRAFTING -> STABILIZATION and STABILIZATION -> EVALUATING."""
    if state == S.GRAFTING and steps_in_state >= cfg.grafting_steps:
        return GateDecision(S.STABILIZATION, f"alpha reached 1 after {steps_in_state} grafting steps")
    if state == S.STABILIZATION and steps_in_state >= cfg.stabilization_steps:
        return GateDecision(S.EVALUATING, f"stabilised for {steps_in_state} steps")
    return None


def contribution_gate(
    state: S, epochs_in_state: int, contribution: float, cfg: LifecycleConfig
) -> GateDecision | None:
    """EVALUATING / FINE_TUNING gates on a measured counterfactual contribution."""
    text = f"contribution {contribution:+.6f} (must exceed {cfg.min_contribution:+.6f})"
    if not math.isfinite(contribution) or contribution <= cfg.min_contribution:
        return GateDecision(S.CULLED, f"{text} in {state.name}")
    if state == S.EVALUATING:
        return GateDecision(S.FINE_TUNING, f"{text} after {epochs_in_state} evaluation epoch(s)")
    if state == S.FINE_TUNING and epochs_in_state >= cfg.fine_tuning_epochs:
        return GateDecision(S.FOSSILIZED, f"{text} held for {epochs_in_state} fine-tuning epoch(s)")
    return None


def min_lifecycle_epochs(cfg: LifecycleConfig, steps_per_epoch: int) -> int:
    """Fewest epochs from germination (at an epoch boundary) to the FOSSILIZED verdict.

    The step gates take at least training_min_steps + grafting_steps + stabilization_steps steps,
    which end inside the k-th epoch after germination. Epoch counters advance before the gates
    look at them, so EVALUATING is measured at the boundary of that epoch when
    evaluation_epochs <= 1 (max(1, n) - 1 boundaries later in general), and FINE_TUNING reaches its
    verdict max(1, fine_tuning_epochs) boundaries after it starts.
    """
    step_epochs = math.ceil((cfg.training_min_steps + cfg.grafting_steps + cfg.stabilization_steps)
                            / max(1, steps_per_epoch))
    return step_epochs + max(1, cfg.evaluation_epochs) - 1 + max(1, cfg.fine_tuning_epochs)


def needs_contribution(state: S, epochs_in_state: int, cfg: LifecycleConfig) -> bool:
    """Whether the epoch-end gate of this seed needs a counterfactual measurement now."""
    if state == S.EVALUATING:
        return epochs_in_state >= cfg.evaluation_epochs
    return state == S.FINE_TUNING
