"""The one configuration schema of a training run: typed dataclasses, YAML files, dotted overrides.

Precedence is defaults < YAML file < command-line overrides (`optim.lr=0.01 model.width=64`).
Unknown keys and values of the wrong type raise `ConfigError` naming the dotted key and the type
that was expected, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from esper.kasmina.growth.config import GrowthConfig, check_growth_config
from esper.kasmina.lifecycle import LifecycleConfig
from esper.tamiyo.settings import LEGACY_GROWTH_KEYS, PolicySettings
from esper.tolaria.config_parsing import (
    ConfigError,
    apply_override,
    check_choices,
    flatten,
    load_yaml,
    merge,
    parse_override,
)
from esper.tolaria.services_config import ServicesConfig, validate_services

# Fixed choices are Literal types: the type is the one list of allowed values.
DatasetName = Literal["digits", "mnist1d", "cifar10", "cifar100", "teacher_student"]
ModelName = Literal["mlp", "cnn1d", "cnn2d", "resnet18"]
OptimizerName = Literal["sgd", "adamw"]
ScheduleName = Literal["constant", "cosine", "step"]
DeviceName = Literal["auto", "cpu", "cuda"]
WandbMode = Literal["auto", "online", "offline"]


@dataclass
class Mnist1dConfig:
    """Generation settings of MNIST-1D, those of `mnist1d.data.get_dataset_args()` (its defaults)."""

    num_samples: int = 5000
    train_split: float = 0.8
    template_len: int = 12
    padding: list[int] = field(default_factory=lambda: [36, 60])
    scale_coeff: float = 0.4
    max_translation: int = 48
    corr_noise_scale: float = 0.25
    iid_noise_scale: float = 0.02
    shear_scale: float = 0.75
    # Permute the sequence positions (one fixed permutation): removes spatial structure.
    shuffle_seq: bool = False
    final_seq_length: int = 40
    seed: int = 42


@dataclass
class DataConfig:
    """Which dataset, where it lives and how it is batched."""

    name: DatasetName = "digits"
    data_dir: str = "data"
    batch_size: int = 64
    eval_batch_size: int = 512
    val_fraction: float = 0.2
    # Random crop + horizontal flip on image datasets (CIFAR).
    augment: bool = False
    # Synthetic teacher-student task sizes.
    synthetic_samples: int = 4000
    synthetic_features: int = 32
    synthetic_classes: int = 10
    synthetic_teacher_hidden: int = 128
    # Subsample the training split (0 = all); keeps benchmarks and tests small.
    train_limit: int = 0
    mnist1d: Mnist1dConfig = field(default_factory=Mnist1dConfig)


@dataclass
class ModelConfig:
    """The host model. `width` is the base width: MLP hidden units, the first CNN stage's channels
    (later stages are `width * stage_multipliers[i]`), the ResNet stem width."""

    name: ModelName = "mlp"
    width: int = 64
    # MLP hidden layers / number of CNN stages is len(stage_multipliers).
    depth: int = 2
    stage_multipliers: list[int] = field(default_factory=lambda: [1, 2, 2])


@dataclass
class OptimConfig:
    """Optimizer and gradient clipping (0 disables clipping)."""

    name: OptimizerName = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 0.0


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, stepped once per optimizer step; warmup is linear from 0."""

    name: ScheduleName = "cosine"
    warmup_epochs: float = 0.0
    step_epochs: int = 10
    gamma: float = 0.1
    min_lr_ratio: float = 0.0


@dataclass
class TrainConfig:
    """The training loop proper."""

    epochs: int = 10
    seed: int = 0
    device: DeviceName = "auto"
    # Mixed precision (autocast + GradScaler); only ever used when the device is CUDA.
    amp: bool = True
    # Autocast dtype under amp: float16 (with a grad scaler) or bfloat16 (none needed).
    amp_dtype: Literal["float16", "bfloat16"] = "float16"
    # Stop after this many epochs without a better validation loss (0 disables).
    early_stopping_patience: int = 0
    # Stop after this many optimizer steps (0 = epochs * batches); the schedule spans min of both.
    max_steps: int = 0
    torch_threads: int = 0


@dataclass
class SeedsConfig:
    """Where seeds are planted. An empty `sites` list means every natural site of the model."""

    sites: list[str] = field(default_factory=list)
    num_seeds: int = 1
    # Blueprints the controller may choose from (empty = every one fitting the site).
    blueprints: list[str] = field(default_factory=list)


# The controller section is Tamiyo's own settings type: one definition, one set of defaults.
ControllerConfig = PolicySettings


@dataclass
class GovernorConfig:
    """Rollback on NaN/Inf or a loss spike."""

    enabled: bool = True
    # A step loss above `spike_factor` times the running mean counts as a spike.
    spike_factor: float = 5.0
    # ... and more than this many running standard deviations above the running loss.
    spike_zscore: float = 6.0
    # ... and more than this far above the running loss in absolute terms (nats of cross-entropy):
    # near convergence the ratio and z-score fire on single hard batches.
    spike_min_delta: float = 0.5
    spike_warmup_steps: int = 20


@dataclass
class CheckpointConfig:
    """Checkpoint cadence and retention."""

    every_epochs: int = 1
    keep_last: int = 2
    save_best: bool = True


@dataclass
class LoggingConfig:
    """Metrics sinks (esper.tolaria.loggers), the trainer's Prometheus endpoint and the profiler."""

    tensorboard: bool = True
    timeline_plot: bool = True
    log_every_steps: int = 10
    # Weights & Biases (the optional `tracking` extra). auto: online with credentials, else offline.
    wandb: bool = False
    wandb_project: str = "esper"
    wandb_entity: str = ""
    wandb_mode: WandbMode = "auto"
    # How long an online start may try to reach the W&B server before the run logs offline.
    wandb_init_timeout_s: float = 30.0
    # Log the exported model (esper-export) as a W&B artifact at the end of the run.
    wandb_log_model: bool = True
    # Prometheus /metrics of the trainer (esper.tolaria.prometheus): -1 off, 0 any free port.
    prometheus_port: int = -1
    prometheus_host: str = "127.0.0.1"
    # torch.profiler over this many steps (0 off) after `profile_warmup_steps` (esper.tolaria.profiling).
    profile_steps: int = 0
    profile_warmup_steps: int = 5


@dataclass
class Config:
    """The resolved configuration of one `esper-train` run."""

    run_name: str = "run"
    morphogenetic: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seeds: SeedsConfig = field(default_factory=SeedsConfig)
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    governor: GovernorConfig = field(default_factory=GovernorConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    services: ServicesConfig = field(default_factory=ServicesConfig)

    # The growth section is written `growth.*` but is the controller's own `growth` (Tamiyo's
    # policy settings carry Kasmina's GrowthConfig): one object, one set of defaults.
    SECTION_ALIASES: ClassVar[dict[str, str]] = {"growth": "controller.growth"}

    @property
    def growth(self) -> GrowthConfig:
        """The run's growth section (``growth.*``): the controller's `PolicySettings.growth`."""
        return self.controller.growth


# Keys that define the model's architecture: a resume must not change them.
ARCHITECTURE_KEYS = (
    "data.name",
    "data.synthetic_features",
    "data.synthetic_classes",
    "model",
    "seeds.sites",
    "seeds.num_seeds",
)


def policy_config(cfg: Config) -> dict[str, Any]:
    """The Tamiyo policy knobs of a run: its controller section (its growth section included) plus
    the allowed blueprints (the mapping `esper.tamiyo.settings.policy_settings_from_mapping` reads,
    in-process or in Tamiyo)."""
    section = dataclasses.asdict(cfg.controller)
    section["blueprints"] = list(cfg.seeds.blueprints or cfg.controller.blueprints)
    return section


def validate(config: Config) -> None:
    """Checks closed value sets and ranges that the types alone do not express."""
    check_choices(config, "")
    seeds_bp, ctl_bp = list(config.seeds.blueprints), list(config.controller.blueprints)
    if seeds_bp and ctl_bp and seeds_bp != ctl_bp:
        raise ConfigError(f"seeds.blueprints {seeds_bp} and controller.blueprints {ctl_bp} disagree; "
                          "expected one of them (or both the same)")
    try:
        check_growth_config(config.growth)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    positive = {
        "data.batch_size": config.data.batch_size,
        "data.eval_batch_size": config.data.eval_batch_size,
        "train.epochs": config.train.epochs,
        "seeds.num_seeds": config.seeds.num_seeds,
        "checkpoint.every_epochs": config.checkpoint.every_epochs,
        "checkpoint.keep_last": config.checkpoint.keep_last,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: expected an int >= 1, got {value}")
    _validate_mnist1d(config.data.mnist1d)
    if not 0.0 < config.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: expected a float in (0, 1), got {config.data.val_fraction}")
    if config.optim.lr <= 0:
        raise ConfigError(f"optim.lr: expected a float > 0, got {config.optim.lr}")
    if config.model.width < 1:
        raise ConfigError(f"model.width: expected an int >= 1, got {config.model.width}")
    try:
        config.lifecycle.validate()
    except ValueError as exc:
        raise ConfigError(f"lifecycle: {str(exc).replace('LifecycleConfig.', 'lifecycle.')}") from None
    validate_services(config.services)
    _validate_logging(config.logging)


def _validate_logging(log: LoggingConfig) -> None:
    if not -1 <= log.prometheus_port < 65536:
        raise ConfigError(f"logging.prometheus_port: expected -1 (off), 0 (any free port) or a port, got {log.prometheus_port}")
    if log.profile_steps < 0 or log.profile_warmup_steps < 0:
        raise ConfigError("logging.profile_steps and logging.profile_warmup_steps: expected ints >= 0, got "
                          f"{log.profile_steps} and {log.profile_warmup_steps}")
    if log.wandb_init_timeout_s <= 0:
        raise ConfigError(f"logging.wandb_init_timeout_s: expected a float > 0, got {log.wandb_init_timeout_s}")
    if log.wandb and not log.wandb_project.strip():
        raise ConfigError("logging.wandb_project: expected a W&B project name, got an empty string")


def _validate_mnist1d(m: Mnist1dConfig) -> None:
    for key in ("num_samples", "template_len", "final_seq_length"):
        if getattr(m, key) < 1:
            raise ConfigError(f"data.mnist1d.{key}: expected an int >= 1, got {getattr(m, key)}")
    if not 0.0 < m.train_split < 1.0:
        raise ConfigError(f"data.mnist1d.train_split: expected a float in (0, 1), got {m.train_split}")
    if len(m.padding) != 2 or not 0 <= m.padding[0] <= m.padding[1]:
        raise ConfigError(f"data.mnist1d.padding: expected [low, high] with 0 <= low <= high, got {m.padding}")
    for key in ("scale_coeff", "corr_noise_scale", "iid_noise_scale", "shear_scale"):
        if getattr(m, key) < 0:
            raise ConfigError(f"data.mnist1d.{key}: expected a float >= 0, got {getattr(m, key)}")
    if m.max_translation < 0:
        raise ConfigError(f"data.mnist1d.max_translation: expected an int >= 0, got {m.max_translation}")


def _without_legacy_keys(values: dict[str, Any]) -> dict[str, Any]:
    """`values` without the controller's flat growth keys that esper-train wrote into config.yaml
    and checkpoints before the growth section became the controller's (they never took effect:
    the growth section always won), so those runs still resume and export."""
    controller = values.get("controller")
    if not isinstance(controller, dict) or not set(controller) & set(LEGACY_GROWTH_KEYS):
        return values
    kept = {k: v for k, v in controller.items() if k not in LEGACY_GROWTH_KEYS}
    return {**values, "controller": kept}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Builds the resolved config: defaults, then the YAML file, then the dotted overrides."""
    config = Config()
    if path is not None:
        merge(config, _without_legacy_keys(load_yaml(path)), "")
    for text in overrides or []:
        key, value = parse_override(text)
        apply_override(config, key, value)
    validate(config)
    return config


def from_dict(values: dict[str, Any]) -> Config:
    """Rebuilds a config from `to_dict` output (e.g. the copy stored in a checkpoint)."""
    config = Config()
    merge(config, _without_legacy_keys(values), "")
    validate(config)
    return config


def to_dict(config: Config) -> dict[str, Any]:
    """The config as plain nested dicts (YAML/JSON serialisable), sections as users write them
    (the growth section at the top level, last)."""
    values = dataclasses.asdict(config)
    for alias, path in Config.SECTION_ALIASES.items():
        owner, _, name = path.partition(".")
        values[alias] = values[owner].pop(name)
    return values


def to_yaml(config: Config) -> str:
    """The resolved config as YAML, sections in schema order."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def architecture_of(config: Config | dict[str, Any]) -> dict[str, Any]:
    """The subset of the config that fixes the model's architecture, as flat dotted keys."""
    flat = flatten(to_dict(config) if isinstance(config, Config) else config)
    out = {}
    for key, value in flat.items():
        if any(key == k or key.startswith(k + ".") for k in ARCHITECTURE_KEYS):
            out[key] = value
    return out


