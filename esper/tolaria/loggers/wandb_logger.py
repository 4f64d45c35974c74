"""Weights & Biases: config, step and epoch metrics, lifecycle events, timeline, summary, model.

`wandb` is an optional dependency (the `tracking` extra, which `make build` installs): it is
imported only when a run asks for it, and its absence is a clear error, not a traceback.

Mode `auto` logs online when W&B credentials are present (WANDB_API_KEY, or a `wandb login` entry
in ~/.netrc) and offline otherwise; an online start that cannot reach the server falls back to
offline. An offline run lives in `<run_dir>/wandb/offline-run-*` and `wandb sync <that dir>`
uploads it later. WANDB_MODE in the environment wins over the config (wandb's own convention).
"""

from __future__ import annotations

import json
import math
import netrc
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from esper.tolaria.config import ConfigError, LoggingConfig

RUN_ID_FILE = "wandb_run_id"


class TrackingError(ConfigError):
    """Experiment tracking was asked for but cannot run (library missing)."""


def import_wandb() -> Any:
    """The `wandb` module, or a TrackingError saying how to install it."""
    try:
        import wandb
    except ImportError as exc:
        raise TrackingError(
            f"logging.wandb: W&B tracking was requested (--wandb or logging.wandb=true) but the wandb package "
            f"cannot be imported ({exc}); expected it installed: `pip install 'esper[tracking]'` "
            "(make build installs it), or run without --wandb"
        ) from None
    return wandb


def has_credentials() -> bool:
    """True when W&B could authenticate without a prompt (env key, identity token or ~/.netrc)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def choose_mode(requested: str) -> str:
    """online/offline for logging.wandb_mode (auto: online only with credentials); WANDB_MODE wins."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    if requested == "auto":
        return "online" if has_credentials() else "offline"
    return requested


class WandbLogger:
    """Logs a run to W&B; see the module docstring for modes and where an offline run lives."""

    def __init__(self, run_dir: Path, settings: LoggingConfig, run_name: str, resuming: bool,
                 echo: Callable[[str], None] = print) -> None:
        self._wandb = wandb = import_wandb()
        self.run_dir = Path(run_dir)
        self.settings = settings
        self._echo = echo
        id_path = self.run_dir / RUN_ID_FILE
        # A resumed esper-train run continues the same W&B run (its steps past the checkpoint are
        # logged again; W&B keeps the first value of a step it already has).
        run_id = id_path.read_text().strip() if resuming and id_path.exists() else None
        self.mode = choose_mode(settings.wandb_mode)
        init = {
            "project": settings.wandb_project,
            "entity": settings.wandb_entity or None,
            "name": run_name,
            "id": run_id,
            "resume": "allow",
            "dir": str(self.run_dir),
            # console off: wandb would otherwise wrap stdout, which carries the progress display.
            "settings": wandb.Settings(console="off", silent=True, x_disable_stats=True,
                                       init_timeout=settings.wandb_init_timeout_s),
        }
        try:
            self.run = wandb.init(mode=self.mode, **init)
        except Exception as exc:  # noqa: BLE001 - any failure to reach the server means "log offline"
            if self.mode != "online":
                raise
            echo(f"W&B: cannot start an online run ({type(exc).__name__}: {exc}); logging offline instead")
            self.mode = "offline"
            self.run = wandb.init(mode="offline", **init)
        id_path.write_text(self.run.id)
        self.offline_dir = Path(self.run.settings.sync_dir) if self.mode == "offline" else None
        if self.offline_dir is not None:
            echo(f"W&B: offline run in {self.offline_dir}; upload it later with `wandb sync {self.offline_dir}`")
        elif self.mode == "online":
            echo(f"W&B: logging to {self.run.url}")
        # Epoch metrics are plotted against the epoch, step metrics against the optimizer step.
        self.run.define_metric("step/*", step_metric="trainer/global_step")
        self.run.define_metric("epoch/*", step_metric="trainer/epoch")

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def log_metrics(self, scope: str, step: int, epoch: int, values: Mapping[str, Any]) -> None:
        row: dict[str, Any] = {"trainer/global_step": step, "trainer/epoch": epoch}
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                continue  # strings (rollback reasons) reach W&B through the events table
            row[f"{scope}/{key}"] = value
        if len(row) > 2:
            self.run.log(row, step=step)

    def log_run_end(self, run_dir: Path, summary: Mapping[str, Any]) -> None:
        wandb = self._wandb
        run_dir = Path(run_dir)
        extra: dict[str, Any] = {}
        events = _read_jsonl(run_dir / "events.jsonl")
        if events:
            columns = sorted({key for event in events for key in event})
            rows = [[_cell(event.get(c)) for c in columns] for event in events]
            extra["lifecycle_events"] = wandb.Table(columns=columns, data=rows)
        timeline = run_dir / "timeline.png"
        if timeline.exists():
            extra["seed_timeline"] = wandb.Image(str(timeline))
        if extra:
            self.run.log(extra)
        for key, value in _flat_summary(summary).items():
            self.run.summary[key] = value
        if self.settings.wandb_log_model:
            self._log_model(run_dir)

    def _log_model(self, run_dir: Path) -> None:
        from esper.tolaria.export import export_run

        try:
            manifest = export_run(run_dir)
        except Exception as exc:  # noqa: BLE001 - the run is done; a failed export costs only the artifact
            self._echo(f"W&B: model not logged, export failed: {type(exc).__name__}: {exc}")
            return
        artifact = self._wandb.Artifact(f"{self.run.name or 'esper'}-model", type="model",
                                        metadata={"parameters": manifest["parameters"],
                                                  "seeds": manifest["seeds"]})
        artifact.add_dir(str(run_dir / "export"))
        self.run.log_artifact(artifact)

    def flush(self) -> None:
        pass  # wandb streams to its own process; nothing is buffered here

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _cell(value: Any) -> Any:
    return value if value is None or isinstance(value, str | int | float | bool) else json.dumps(value)


def _flat_summary(summary: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Scalars of summary.json as `a/b` keys (lists such as adaptations are kept as JSON text)."""
    out: dict[str, Any] = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat_summary(value, name + "/"))
        elif isinstance(value, float) and not math.isfinite(value):
            continue
        elif isinstance(value, str | int | float | bool) or value is None:
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out
