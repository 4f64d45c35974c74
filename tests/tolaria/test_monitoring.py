"""Tracking and monitoring of esper-train: W&B offline runs, the trainer's Prometheus endpoint,
the profiler, quick-start presets and the precedence of shorthand flags and dotted overrides."""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from test_data import _write_cifar
from wandb_records import config_values, history_rows, read_records, summary_values

from esper.serving import open_sync_channel
from esper.tolaria.cli import (
    CONFIG_DIR,
    PRESETS,
    UsageError,
    _profile_default,
    build_parser,
    main,
    resolve_config,
)
from esper.tolaria.config import Config, load_config
from esper.tolaria.hooks import BoundaryHook
from esper.tolaria.loggers import read_metrics
from esper.tolaria.loggers.wandb_logger import choose_mode
from esper.tolaria.monitors import Monitors
from esper.tolaria.services import RunServices
from esper.tolaria.trainer import Trainer
from esper.tolaria.trainer_metrics import TrainerMetrics
from esper.v1 import tolaria_pb2, tolaria_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
DEV = str(REPO / "configs" / "development.yaml")
FAST = ["logging.tensorboard=false", "train.torch_threads=1", "logging.timeline_plot=true", "services.mode=off"]


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """No W&B credentials, offline mode, and wandb's own dirs inside tmp_path: nothing reaches the network."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))


def parse(*argv: str):
    """The namespace main() builds from argv."""
    return build_parser().parse_intermixed_args(_profile_default(list(argv)))


# ---------------------------------------------------------------- W&B


@pytest.mark.integration
def test_wandb_offline_run_files_hold_config_metrics_events_summary_and_model(tmp_path, offline_wandb, capsys):
    out = tmp_path / "run"
    assert main(["--quick-start", "digits", "--output-dir", str(out), "--progress", "plain", "--wandb",
                 "--epochs", "4", *FAST]) == 0
    stdout = capsys.readouterr().out
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    assert f"W&B: offline run in {runs[0]}" in stdout and f"wandb sync {runs[0]}" in stdout
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1
    run_file = files[0]

    summary = json.loads((out / "summary.json").read_text())
    rows = history_rows(run_file)
    step_losses = [float(r["step/loss"]) for r in rows if "step/loss" in r]
    want = [r["loss"] for r in read_metrics(out, "step")]
    assert len(step_losses) == summary["global_step"] == len(want)
    assert step_losses == pytest.approx(want)
    val_acc = [float(r["epoch/val_acc"]) for r in rows if "epoch/val_acc" in r]
    assert val_acc == pytest.approx([r["val_acc"] for r in read_metrics(out, "epoch")])
    events = (out / "events.jsonl").read_text().splitlines()
    # The rails only allow growth that can finish before the end: 4 epochs germinate in epoch 1.
    assert events, "the digits preset germinates in epoch 1 of 4"
    tables = [r for r in rows if "lifecycle_events/nrows" in r]
    assert len(tables) == 1 and int(tables[0]["lifecycle_events/nrows"]) == len(events)
    assert any(r.get("seed_timeline/_type") == '"image-file"' for r in rows)

    final = summary_values(run_file)
    assert float(final["test_acc"]) == pytest.approx(summary["test_acc"])
    assert int(final["global_step"]) == summary["global_step"]
    config = config_values(run_file)
    assert json.loads(config["optim"]) == yaml.safe_load((out / "config.yaml").read_text())["optim"]
    artifacts = [r.artifact for r in read_records(run_file) if r.WhichOneof("record_type") == "artifact"]
    assert any(a.type == "model" for a in artifacts), [a.type for a in artifacts]
    assert (out / "export" / "program.pt2").exists()


@pytest.mark.integration
def test_wandb_online_start_that_cannot_reach_the_server_logs_offline(tmp_path, offline_wandb, monkeypatch, capsys):
    import socket

    with socket.socket() as s:  # a loopback port nothing listens on: the "server" refuses at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    out = tmp_path / "run"
    assert main(["--quick-start", "digits", "--output-dir", str(out), "--progress", "none", "--wandb", "--epochs", "1",
                 "logging.wandb_init_timeout_s=2", "logging.wandb_log_model=false", *FAST]) == 0
    stdout = capsys.readouterr().out
    assert "W&B: cannot start an online run" in stdout and "logging offline instead" in stdout
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and f"wandb sync {runs[0]}" in stdout
    rows = history_rows(next(runs[0].glob("run-*.wandb")))
    steps = [int(r["trainer/global_step"]) for r in rows if "step/loss" in r]
    assert steps == [r["step"] for r in read_metrics(out, "step")]  # every step the trainer recorded


def test_wandb_mode_auto_is_offline_without_credentials(tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert choose_mode("auto") == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password secret\n")
    assert choose_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert choose_mode("online") == "offline"  # the environment wins, as in wandb itself


def test_missing_wandb_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without the package does on import
    code = main(["--quick-start", "digits", "--output-dir", str(tmp_path / "run"), "--wandb", "--dry-run", *FAST])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("esper-train: error: logging.wandb:") and "pip install 'esper[tracking]'" in err, err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- Prometheus and the profiler


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class _ScrapeEachEpoch(BoundaryHook):
    """A trainer hook that calls the run's Tolaria server and scrapes the trainer's /metrics while
    the run is going."""

    def __init__(self, metrics: TrainerMetrics, services: RunServices) -> None:
        self.metrics = metrics
        self.services = services
        self.scrapes: list[tuple[int, dict, float, object]] = []

    def after_step(self, trainer, epoch, loss) -> bool:
        self.last_loss = loss
        return False

    def after_epoch(self, trainer, epoch, record) -> bool:
        with open_sync_channel(self.services.tolaria.address) as channel:
            tolaria_pb2_grpc.TolariaServiceStub(channel).GetRunStatus(tolaria_pb2.GetRunStatusRequest(), timeout=10)
        self.scrapes.append((trainer.state.global_step, scrape(self.metrics.endpoint.url), self.last_loss, record))
        return False


@pytest.mark.integration
def test_trainer_metrics_scraped_during_a_run_follow_the_steps(tmp_path):
    config = load_config(DEV, ["train.epochs=4", "model.width=32", "logging.prometheus_port=0", "logging.log_every_steps=5", *FAST])
    monitors = Monitors(config.logging, tmp_path / "run", lambda: services)
    services = RunServices(config, tmp_path / "run", server_metrics=monitors.server_metrics)
    metrics = next(h for h in monitors.hooks if isinstance(h, TrainerMetrics))
    probe = _ScrapeEachEpoch(metrics, services)
    trainer = Trainer(config, tmp_path / "run", progress="none", controller=services.controller_factory(True),
                      hooks=[*monitors.hooks, *services.hooks(), probe])
    trainer.prepare()
    trainer.start()
    closers = monitors.start()
    url = metrics.endpoint.url
    try:
        with services:
            services.attach(trainer)
            trainer.train()
            services.finish(trainer)
    finally:
        for close in closers:
            close()
    assert len(probe.scrapes) == 4
    (step1, first, _, _), (step2, second, loss, record) = probe.scrapes[0], probe.scrapes[-1]
    assert first[("esper_train_steps_total", ())] == step1 and second[("esper_train_steps_total", ())] == step2
    assert second[("esper_train_samples_total", ())] == 4 * len(trainer.data.train)
    assert second[("esper_train_loss", ())] == pytest.approx(loss)
    assert second[("esper_train_val_accuracy", ())] == pytest.approx(record.val_acc)
    assert second[("esper_train_step_seconds_count", ())] == step2 - 4  # the first step of each epoch opens a window
    assert second[("esper_train_throughput_samples_per_second", ())] > 0
    seeds = {labels[0][1]: v for (name, labels), v in second.items() if name == "esper_seeds"}
    assert sum(seeds.values()) == len(trainer.morph.sites())  # one seed per site in this config
    assert seeds["DORMANT"] < len(trainer.morph.sites())  # the digits preset germinates in epoch 1
    # The run's Tolaria server records its RPCs on the same endpoint: one GetRunStatus per epoch so far.
    status = (("grpc_code", "OK"), ("grpc_method", "GetRunStatus"), ("grpc_service", "esper.v1.TolariaService"))
    assert first[("esper_grpc_server_handled_total", status)] == 1
    assert second[("esper_grpc_server_handled_total", status)] == 4
    with pytest.raises(OSError):  # closed with the run
        urllib.request.urlopen(url, timeout=2)


def test_trainer_metrics_export_kernel_cache_stats():
    import torch

    from esper.kasmina import KernelCache

    cache = KernelCache(1 << 20)
    cache.put("k1", "cpu", "torch.float32", torch.nn.Identity(), 1000)
    cache.get("k1", "cpu", "torch.float32")
    cache.get("k2", "cpu", "torch.float32")
    metrics = TrainerMetrics(kernel_stats=cache.stats)
    endpoint = metrics.serve("127.0.0.1", 0)
    try:
        assert not any(name.startswith("esper_kernel_cache") for name, _ in scrape(endpoint.url))
        metrics.refresh_kernel_cache()
        samples = scrape(endpoint.url)
    finally:
        metrics.close()
    assert samples[("esper_kernel_cache_hits_total", ())] == 1
    assert samples[("esper_kernel_cache_misses_total", ())] == 1
    assert samples[("esper_kernel_cache_bytes", ())] == 1000


@pytest.mark.integration
def test_profile_writes_a_valid_chrome_trace_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "run"
    # Warm-up past the first epoch (36 steps): the window sees seeds that germinated at its end.
    assert main(["--config", DEV, "--output-dir", str(out), "--progress", "none", "--epochs", "4",
                 "--profile", "10", "logging.profile_warmup_steps=40", *FAST]) == 0
    stdout = capsys.readouterr().out
    trace = json.loads((out / "profile" / "trace.json").read_text())
    events = trace["traceEvents"]
    assert isinstance(events, list) and len(events) > 100
    complete = [e for e in events if e.get("ph") == "X"]
    assert complete and all({"name", "ts", "dur"} <= set(e) for e in complete)
    assert any(e["name"].startswith("ProfilerStep#") for e in complete)
    report = json.loads((out / "profile" / "summary.json").read_text())
    assert report["steps"] == 10 and report["top_ops"]
    assert report["kasmina_ops_us"] > 0 and 0 < report["seeds_share"] < 1
    assert "self CPU ms" in stdout and "Kasmina ops (esper::*" in stdout and "seeds (forward" in stdout


# ---------------------------------------------------------------- quick start and precedence


@pytest.mark.integration
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_quick_start_preset_passes_dry_run(preset, tmp_path, capsys):
    data = tmp_path / "data"
    if preset.startswith("cifar"):
        _write_cifar(data, int(preset.removeprefix("cifar")), n=20)
    code = main(["--quick-start", preset, "--data-dir", str(data), "--output-dir", str(tmp_path / "run"),
                 "--dry-run", "logging.tensorboard=false"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "# dry run ok" in captured.out
    assert f"run_name: {load_config(CONFIG_DIR / PRESETS[preset]).run_name}" in captured.out
    assert not (tmp_path / "run").exists()


def test_precedence_defaults_file_flags_overrides():
    assert Config().data.batch_size == 64
    from_file = resolve_config(parse("--config", DEV))
    assert from_file.data.batch_size == 32 and from_file.model.width == 8  # file beats defaults
    flags = resolve_config(parse("--config", DEV, "--batch-size", "16", "--learning-rate", "0.2", "--epochs", "4",
                                 "--model", "cnn1d", "--dataset", "mnist1d", "--device", "cpu"))
    assert (flags.data.batch_size, flags.optim.lr, flags.train.epochs) == (16, 0.2, 4)  # flags beat the file
    assert (flags.model.name, flags.data.name, flags.train.device) == ("cnn1d", "mnist1d", "cpu")
    both = resolve_config(parse("--config", DEV, "--batch-size", "16", "data.batch_size=8", "--lr", "0.2",
                                "optim.lr=0.3", "train.device=auto", "--device", "cpu"))
    assert (both.data.batch_size, both.optim.lr, both.train.device) == (8, 0.3, "auto")  # overrides beat flags


def test_flags_for_tracking_profile_and_paths():
    config = resolve_config(parse("--quick-start", "mnist1d", "--wandb", "--profile", "optim.lr=0.01",
                                  "--metrics-port", "0", "--data-dir", "/tmp/a: b"))
    assert config.run_name == "mnist1d" and config.optim.lr == 0.01
    assert config.logging.wandb and config.logging.profile_steps == 20 and config.logging.prometheus_port == 0
    assert config.data.data_dir == "/tmp/a: b"
    assert resolve_config(parse("--profile", "7")).logging.profile_steps == 7
    with pytest.raises(UsageError, match="--quick-start digits and --config"):
        resolve_config(parse("--quick-start", "digits", "--config", DEV))


def test_profile_flag_before_an_override_keeps_the_override():
    assert _profile_default(["--profile", "optim.lr=0.1"]) == ["--profile=20", "optim.lr=0.1"]
    assert _profile_default(["--profile", "5"]) == ["--profile", "5"]
    assert _profile_default(["--profile"]) == ["--profile=20"]


def test_help_groups_flags_like_the_original_cli():
    text = build_parser().format_help()
    titles = ["configuration:", "quick setup", "morphogenetic:", "training control:", "logging:", "services:"]
    positions = [text.index(t) for t in titles]
    assert positions == sorted(positions)
    for flag in ("--quick-start", "--model", "--dataset", "--epochs", "--batch-size", "--learning-rate", "--wandb",
                 "--profile", "--metrics-port"):
        assert flag in text
