"""The one configuration schema of a training run: typed dataclasses, YAML files, dotted overrides.

Precedence is defaults < YAML file < command-line overrides (`optim.lr=0.01 model.width=64`).
Unknown keys and values of the wrong type raise `ConfigError` naming the dotted key and the type
that was expected, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class ConfigError(ValueError):
    """A config file or override is malformed; the message names the key and what was expected."""


DATASETS = ("digits", "mnist1d", "cifar10", "cifar100", "teacher_student")
MODELS = ("mlp", "cnn1d", "cnn2d", "resnet18")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine", "step")
DEVICES = ("auto", "cpu", "cuda")
POLICIES = ("heuristic", "random", "gnn")
SERVICE_MODES = ("local", "remote", "off")
SERVICE_NAMES = ("urza", "tezzeret", "oona", "tamiyo")


@dataclass
class DataConfig:
    """Which dataset, where it lives and how it is batched."""

    name: str = "digits"
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


@dataclass
class ModelConfig:
    """The host model. `width` is the base width: MLP hidden units, the first CNN stage's channels
    (later stages are `width * stage_multipliers[i]`), the ResNet stem width."""

    name: str = "mlp"
    width: int = 64
    # MLP hidden layers / number of CNN stages is len(stage_multipliers).
    depth: int = 2
    stage_multipliers: list[int] = field(default_factory=lambda: [1, 2, 2])


@dataclass
class OptimConfig:
    """Optimizer and gradient clipping (0 disables clipping)."""

    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 0.0


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, stepped once per optimizer step; warmup is linear from 0."""

    name: str = "cosine"
    warmup_epochs: float = 0.0
    step_epochs: int = 10
    gamma: float = 0.1
    min_lr_ratio: float = 0.0


@dataclass
class TrainConfig:
    """The training loop proper."""

    epochs: int = 10
    seed: int = 0
    device: str = "auto"
    # Mixed precision (autocast + GradScaler); only ever used when the device is CUDA.
    amp: bool = True
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


@dataclass
class LifecycleConfig:
    """Gates of the seed lifecycle (steps are optimizer steps); mirrors esper.kasmina.lifecycle."""

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
    # Counterfactual contribution (validation accuracy with the seed minus with alpha=0, as a
    # fraction) a seed must exceed to be fossilized; 0 means it must be positive.
    min_contribution: float = 0.0
    # Per-site thresholds that replace min_contribution at that site, e.g. {hidden.1: 0.01}.
    min_contribution_per_site: dict[str, float] = field(default_factory=dict)
    embargo_epochs: int = 2
    germination_timeout_epochs: int = 3


@dataclass
class ControllerConfig:
    """The Tamiyo policy and the safety rails that apply to every policy."""

    # heuristic, random, or gnn: a learned policy from policy_path (esper-train --tamiyo-policy PATH).
    policy: str = "heuristic"
    policy_path: str = ""
    # Seed of the random policy's choices.
    random_seed: int = 0
    # No germination before this epoch (the host gets a head start).
    start_epoch: int = 1
    # Plateau: relative improvement of val loss over `plateau_window` epochs below the threshold.
    plateau_window: int = 2
    plateau_threshold: float = 0.01
    # Germinate without waiting for a plateau (forces growth, e.g. in tests and demos).
    grow_without_plateau: bool = False
    cooldown_epochs: int = 1
    max_concurrent: int = 1
    # Growth budgets relative to the host: extra parameters and extra FLOPs per sample.
    parameter_budget: float = 1.0
    compute_budget: float = 1.0
    max_adaptations: int = 8


@dataclass
class ServicesConfig:
    """How the run reaches Urza, Tezzeret, Oona and Tamiyo (see esper.tolaria.services).

    local: `esper-train` starts them as child processes on loopback (the default; the environment
    variable ESPER_SERVICES_MODE changes the default, e.g. to `off` for fast test suites);
    remote: connect to `addresses`; off: the in-process controller, no services.
    """

    mode: str = field(default_factory=lambda: os.environ.get("ESPER_SERVICES_MODE", "local"))
    # name -> host:port for mode remote (urza, tezzeret, oona, tamiyo).
    addresses: dict[str, str] = field(default_factory=dict)
    # The in-process Tolaria gRPC server (run status, metrics, seeds, checkpoint, stop); -1 disables it.
    tolaria_port: int = 0
    # Deadline of one Decide call; a slower Tamiyo means "no decision this epoch".
    decision_timeout_s: float = 2.0
    # Deadline of other unary calls (Urza lookups, compile requests, reports, publishes).
    call_timeout_s: float = 5.0
    compile_timeout_s: float = 120.0
    # Backoff between attempts to reach a service that is down: initial, doubled up to the max.
    retry_initial_s: float = 0.5
    retry_max_s: float = 8.0
    # Local mode: how long each service may take to become healthy, compile workers, Oona backend.
    start_timeout_s: float = 120.0
    tezzeret_workers: int = 1
    oona_backend: str = "memory://"
    # Local mode (Linux): the CPUs the services, their compile workers and the trainer's network
    # threads run on, so that a compile never takes a core from the training step (esper.cpus).
    # auto: the last CPU serves and the rest train (from 2 CPUs on; a quarter serve from 8 on),
    # and torch uses one intra-op thread per training CPU unless train.torch_threads is set;
    # off: everything shares every CPU; or a CPU list such as "3" or "6-7" that serves (in
    # remote mode only an explicit list partitions: services started on those CPUs by hand).
    cpus: str = "auto"


@dataclass
class GovernorConfig:
    """Rollback on NaN/Inf or a loss spike."""

    enabled: bool = True
    # A step loss above `spike_factor` times the running mean counts as a spike.
    spike_factor: float = 5.0
    # ... and more than this many running standard deviations above the running loss.
    spike_zscore: float = 6.0
    spike_warmup_steps: int = 20


@dataclass
class CheckpointConfig:
    """Checkpoint cadence and retention."""

    every_epochs: int = 1
    keep_last: int = 2
    save_best: bool = True


@dataclass
class LoggingConfig:
    """Metrics sinks."""

    tensorboard: bool = True
    timeline_plot: bool = True
    log_every_steps: int = 10


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


# Keys whose values must be one of a closed set; checked after the types.
_CHOICES: dict[str, tuple[str, ...]] = {
    "data.name": DATASETS,
    "model.name": MODELS,
    "optim.name": OPTIMIZERS,
    "schedule.name": SCHEDULES,
    "train.device": DEVICES,
    "controller.policy": POLICIES,
    "services.mode": SERVICE_MODES,
}

# Keys that define the model's architecture: a resume must not change them.
ARCHITECTURE_KEYS = (
    "data.name",
    "data.synthetic_features",
    "data.synthetic_classes",
    "model",
    "seeds.sites",
    "seeds.num_seeds",
)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"list of {_type_name(inner)}"
    if origin is dict:
        _, inner = typing.get_args(tp)
        return f"mapping of string to {_type_name(inner)}"
    return {bool: "bool", int: "int", float: "float", str: "string"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Checks `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin is dict:
        _, inner = typing.get_args(tp)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return {k: _coerce(f"{key}.{k}", v, inner) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            return float(value)  # YAML 1.1 reads `1e-3` (no dot) as a string
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # e.g. services.cpus=3
    else:  # pragma: no cover - the schema only uses the types above
        raise TypeError(f"unsupported config type {tp!r} for {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _merge(obj: Any, values: dict[str, Any], prefix: str) -> None:
    """Writes `values` (a nested dict) into the dataclass `obj`, checking names and types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {type(values).__name__}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ConfigError(
                f"unknown config key '{key}'; expected one of: {', '.join(sorted(names))}"
            )
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            _merge(getattr(obj, name), value, f"{key}.")
        else:
            setattr(obj, name, _coerce(key, value, tp))


def policy_config(cfg: Config) -> dict[str, Any]:
    """The Tamiyo policy knobs of a run: its controller section plus the allowed blueprints (the
    mapping `esper.tamiyo.service.policy_settings_from_mapping` reads, in-process or in Tamiyo)."""
    section = dataclasses.asdict(cfg.controller)
    section["blueprints"] = list(cfg.seeds.blueprints)
    return section


def validate(config: Config) -> None:
    """Checks closed value sets and ranges that the types alone do not express."""
    flat = to_dict(config)
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = flat[section][name]
        if value not in choices:
            raise ConfigError(f"{key}: unknown value '{value}'; expected one of: {', '.join(choices)}")
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
    if not 0.0 < config.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: expected a float in (0, 1), got {config.data.val_fraction}")
    if config.optim.lr <= 0:
        raise ConfigError(f"optim.lr: expected a float > 0, got {config.optim.lr}")
    if config.model.width < 1:
        raise ConfigError(f"model.width: expected an int >= 1, got {config.model.width}")
    _validate_services(config.services)


def _validate_services(svc: ServicesConfig) -> None:
    unknown = [n for n in svc.addresses if n not in SERVICE_NAMES]
    if unknown:
        raise ConfigError(f"services.addresses: unknown service(s) {unknown}; expected some of {list(SERVICE_NAMES)}")
    for name, address in svc.addresses.items():
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"services.addresses.{name}: expected host:port (e.g. 127.0.0.1:50051), got {address!r}")
    if svc.mode == "remote":
        missing = [n for n in SERVICE_NAMES if n not in svc.addresses]
        if missing:
            raise ConfigError(f"services.mode remote needs services.addresses for {missing}; "
                              "expected host:port for each of urza, tezzeret, oona, tamiyo")
    for key in ("decision_timeout_s", "call_timeout_s", "compile_timeout_s", "retry_initial_s", "retry_max_s",
                "start_timeout_s"):
        if getattr(svc, key) <= 0:
            raise ConfigError(f"services.{key}: expected a float > 0, got {getattr(svc, key)}")
    if svc.tezzeret_workers < 1:
        raise ConfigError(f"services.tezzeret_workers: expected an int >= 1, got {svc.tezzeret_workers}")
    if svc.cpus.strip().lower() not in ("auto", "off"):
        from esper.cpus import CpuSpecError, parse_cpu_list

        try:
            parse_cpu_list(svc.cpus)
        except CpuSpecError as exc:
            raise ConfigError(f"services.cpus: {exc}; expected auto, off or a CPU list such as 3 or 6-7") from None
    if not -1 <= svc.tolaria_port < 65536:
        raise ConfigError(f"services.tolaria_port: expected -1 (off), 0 (any free port) or a port, got {svc.tolaria_port}")


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false are bools, so `mode: off` stays "off"."""


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)


def parse_override(text: str) -> tuple[str, Any]:
    """Parses `a.b.c=value`; the value is read as YAML so `0.01`, `true`, `[1, 2]` get their types."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected KEY=VALUE with a dotted key, e.g. optim.lr=0.01")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': expected a dotted key such as optim.lr")
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc.__class__.__name__})") from None
    return key, value


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cursor = out
    parts = key.split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML config file into a dict, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; expected a YAML file such as configs/development.yaml")
    try:
        data = _load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}; expected a mapping of sections") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}': expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Builds the resolved config: defaults, then the YAML file, then the dotted overrides."""
    config = Config()
    if path is not None:
        _merge(config, load_yaml(path), "")
    for text in overrides or []:
        key, value = parse_override(text)
        apply_override(config, key, value)
    validate(config)
    return config


def apply_override(config: Config, key: str, value: Any) -> None:
    """Sets one dotted key; inside a mapping-typed field the rest of the key is one mapping key
    (so `lifecycle.min_contribution_per_site.hidden.1=0.02` names the site `hidden.1`)."""
    parts = key.split(".")
    obj: Any = config
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj):
            break
        hints = typing.get_type_hints(type(obj))
        if part in hints and typing.get_origin(hints[part]) is dict and i + 1 < len(parts):
            rest = ".".join(parts[i + 1 :])
            _, inner = typing.get_args(hints[part])
            getattr(obj, part)[rest] = _coerce(key, value, inner)
            return
        if part in hints and dataclasses.is_dataclass(hints[part]):
            obj = getattr(obj, part)
            continue
        break
    _merge(config, _nest(key, value), "")


def from_dict(values: dict[str, Any]) -> Config:
    """Rebuilds a config from `to_dict` output (e.g. the copy stored in a checkpoint)."""
    config = Config()
    _merge(config, values, "")
    validate(config)
    return config


def to_dict(config: Config) -> dict[str, Any]:
    """The config as plain nested dicts (YAML/JSON serialisable)."""
    return dataclasses.asdict(config)


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


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {dotted.key: value}."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            out.update(flatten(value, key + "."))
        else:
            out[key] = value
    return out

