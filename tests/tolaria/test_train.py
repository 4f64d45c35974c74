"""esper-train end to end on digits: the lifecycle really runs, resume is exact, bad input exits 2."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from esper.tolaria import checkpoint as ckpt
from esper.tolaria.cli import main
from esper.tolaria.loggers import read_metrics
from esper.v1 import common_pb2

REPO = Path(__file__).resolve().parents[2]
DEV = str(REPO / "configs" / "development.yaml")
# model.width=32: the digits host these tests were written for (the shipped config is 2x8 since).
FAST = ["logging.tensorboard=false", "train.torch_threads=1", "model.width=32"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "esper.tolaria.cli", *args]


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.integration
def test_digits_run_fossilizes_one_seed_and_culls_another(tmp_path):
    # Forced through config only: every seed passes the contribution gate (min -1) except at
    # hidden.0, whose per-site threshold (2.0, more than any accuracy difference) cannot be met.
    out = tmp_path / "run"
    code = main(["--config", DEV, "--output-dir", str(out), "--progress", "plain", "train.epochs=7",
                 "lifecycle.min_contribution=-1.0", "lifecycle.min_contribution_per_site.hidden.0=2.0",
                 "controller.max_concurrent=2", *FAST])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"].get("fossilized", 0) >= 1, summary["seeds"]
    assert summary["seeds"].get("culled", 0) >= 1, summary["seeds"]
    for key in ("final_val_acc", "best_val_acc", "params_initial", "params_final", "adaptations", "wall_s"):
        assert key in summary
    assert summary["params_final"] > summary["params_initial"]
    assert summary["best_val_acc"] > 0.8
    outcomes = {(a["layer"], a["outcome"]) for a in summary["adaptations"]}
    assert ("hidden.0", "culled") in outcomes and ("hidden.1", "fossilized") in outcomes
    for a in summary["adaptations"]:
        assert {"epoch", "layer", "blueprint", "outcome", "contribution"} <= set(a)
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    path = [e["to"] for e in events if e["layer"] == "hidden.1" and e["seed"] == 0]
    assert path[:7] == ["GERMINATED", "TRAINING", "GRAFTING", "STABILIZATION", "EVALUATING", "FINE_TUNING",
                        "FOSSILIZED"]
    assert (out / "timeline.png").stat().st_size > 1000
    assert (out / "config.yaml").read_text().count("min_contribution_per_site") == 1
    epochs = read_metrics(out, "epoch")
    assert [r["epoch"] for r in epochs] == list(range(1, 8))


@pytest.mark.integration
def test_no_morphogenetic_baseline_never_germinates(tmp_path):
    out = tmp_path / "base"
    assert main(["--config", DEV, "--output-dir", str(out), "--no-morphogenetic", "--progress", "plain",
                 "train.epochs=2", *FAST]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["adaptations"] == [] and summary["params_final"] == summary["params_initial"]
    assert summary["morphogenetic"] is False


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.02)


@pytest.mark.integration
def test_resume_after_kill_follows_the_same_loss_curve(tmp_path):
    args = ["--config", DEV, "--progress", "plain", "train.epochs=4", *FAST]
    straight = tmp_path / "straight"
    assert main([*args, "--output-dir", str(straight)]) == 0  # in-process: the reference curve

    cut = tmp_path / "cut"
    proc = subprocess.Popen(cli(*args, "--output-dir", str(cut)), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(cut / "checkpoints" / "epoch_0002" / ckpt.MARKER, proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not (cut / "summary.json").exists()  # it really died mid-run
    latest = ckpt.latest_checkpoint(cut)
    payload = ckpt.load_checkpoint(latest)
    assert any(s["state"] != "DORMANT" for s in payload["seed_manifest"]), "no seed germinated before the cut"

    resumed = run_cli("--output-dir", str(cut), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    want = [(r["step"], r["loss"]) for r in read_metrics(straight, "step")]
    got = [(r["step"], r["loss"]) for r in read_metrics(cut, "step")]
    assert len(want) == len(got) > 0
    assert got == want  # bitwise-identical per-step losses on CPU
    a = json.loads((straight / "summary.json").read_text())
    b = json.loads((cut / "summary.json").read_text())
    assert a["final_val_acc"] == b["final_val_acc"] and a["params_final"] == b["params_final"]
    assert [x["outcome"] for x in a["adaptations"]] == [x["outcome"] for x in b["adaptations"]]


_WRITER = r"""
import sys, torch
from pathlib import Path
from esper.tolaria import checkpoint as ckpt
run = Path(sys.argv[1])
ckpt.save_checkpoint(run, 1, {"weights": torch.ones(4)}, keep_last=3)
print("first", flush=True)
big = torch.randn(64, 1024, 1024)  # 256 MiB: the write takes long enough to be interrupted
while True:
    ckpt.save_checkpoint(run, 2, {"weights": big}, keep_last=3)
"""


@pytest.mark.integration
def test_killed_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "first"
        root = tmp_path / "checkpoints"
        deadline = time.monotonic() + 60
        while not any(p.name.startswith(".tmp-epoch_0002") for p in root.iterdir()):
            assert time.monotonic() < deadline, "the second write never started"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert any(p.name.startswith(".tmp-") for p in (tmp_path / "checkpoints").iterdir())
    latest = ckpt.latest_checkpoint(tmp_path)
    if latest.name == "epoch_0002":
        # The kill landed after a complete earlier write of epoch 2; the partial one is still ignored.
        assert ckpt.is_complete(latest)
    else:
        assert latest.name == "epoch_0001"
        assert torch.equal(ckpt.load_checkpoint(tmp_path)["weights"], torch.ones(4))
    # A directory without its completion marker is never picked, even if it is the newest.
    fake = tmp_path / "checkpoints" / "epoch_0009"
    fake.mkdir()
    torch.save({"format": ckpt.FORMAT}, fake / ckpt.STATE_FILE)
    assert ckpt.latest_checkpoint(tmp_path) == latest
    with pytest.raises(ckpt.CheckpointError, match="partial or corrupt"):
        ckpt.load_checkpoint(fake)


def test_keep_last_and_best(tmp_path):
    for epoch, metric in [(1, 0.5), (2, 0.3), (3, 0.4), (4, 0.6), (5, 0.7)]:
        ckpt.save_checkpoint(tmp_path, epoch, {"e": epoch}, keep_last=2, best_metric=metric)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["epoch_0002", "epoch_0004", "epoch_0005"]  # newest two plus the best
    assert ckpt.read_best(tmp_path)["dir"] == "epoch_0002"


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("done") / "run"
    assert main(["--config", DEV, "--output-dir", str(out), "--progress", "plain", "train.epochs=4",
                 # keep the grown seed whatever it measures: this fixture is about exporting one
                 "lifecycle.min_contribution=-1", *FAST]) == 0
    return out


def _damaged(tmp_path: Path, finished: Path, kind: str) -> Path:
    src = ckpt.latest_checkpoint(finished)
    dst = tmp_path / kind / "checkpoints" / src.name
    dst.mkdir(parents=True)
    state = dst / ckpt.STATE_FILE
    if kind == "corrupt":
        state.write_bytes(b"\x00not a torch file" * 100)
    elif kind == "foreign":
        torch.save({"model": {"w": torch.zeros(1)}, "epoch": 3}, state)
    else:  # partial: state present, marker missing
        state.write_bytes((src / ckpt.STATE_FILE).read_bytes())
        return dst
    marker = {"format": ckpt.FORMAT, "epoch": 2, "sha256": hashlib.sha256(state.read_bytes()).hexdigest()}
    (dst / ckpt.MARKER).write_text(json.dumps(marker))
    return dst


BAD_CASES = {
    "missing config": (["--config", "/nonexistent/x.yaml"], "config file '/nonexistent/x.yaml' does not exist"),
    "malformed config": (["--config", "{bad}"], "is not valid YAML"),
    "unknown key": (["--config", DEV, "optim.lrr=0.1"], "unknown config key 'optim.lrr'"),
    "wrong type": (["--config", DEV, "train.epochs=many"], "train.epochs: expected int, got str 'many'"),
    "unknown dataset": (["--config", DEV, "data.name=imagenet"], "data.name: unknown value 'imagenet'"),
    "unknown model": (["--config", DEV, "model.name=vit"], "model.name: unknown value 'vit'"),
    "model does not fit data": (["--config", DEV, "model.name=resnet18"], "expects 32x32 images"),
    "no data files": (["--config", DEV, "data.name=cifar10", "model.name=cnn2d", "--data-dir", "{empty}"],
                      "missing file"),
    "unknown seed site": (["--config", DEV, "seeds.sites=[hidden.7]"], "seeds: model has no submodule 'hidden.7'"),
    "corrupt checkpoint": (["--config", DEV, "--resume", "{corrupt}"], "cannot be read"),
    "foreign checkpoint": (["--config", DEV, "--resume", "{foreign}"], "is not an Esper training checkpoint"),
    "partial checkpoint": (["--config", DEV, "--resume", "{partial}"], "partial or corrupt"),
    "architecture change": (["--config", DEV, "--resume", "auto", "model.width=64"],
                            "changes the architecture at 'model.width'"),
    "run exists": (["--config", DEV], "already holds a run"),
    "bad override syntax": (["--config", DEV, "optim.lr"], "expected KEY=VALUE"),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_exits_2_with_one_line_and_touches_nothing(case, finished_run, tmp_path, capsys):
    args, expected = BAD_CASES[case]
    malformed = tmp_path / "bad.yaml"
    malformed.write_text("optim:\n  lr: [0.1\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    subs = {"{bad}": str(malformed), "{empty}": str(empty)}
    for kind in ("corrupt", "foreign", "partial"):
        if f"{{{kind}}}" in args:
            subs[f"{{{kind}}}"] = str(_damaged(tmp_path, finished_run, kind))
    args = [subs.get(a, a) for a in args]
    before = tree_digest(finished_run)
    capsys.readouterr()
    code = main([*args, "--output-dir", str(finished_run), "--progress", "plain"])
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("esper-train: error: "), captured.err
    assert expected in lines[0]
    assert tree_digest(finished_run) == before


@pytest.mark.integration
def test_console_process_exit_code(tmp_path):
    bad = run_cli("--config", DEV, "optim.lr=oops", "--output-dir", str(tmp_path / "x"))
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "optim.lr: expected float" in bad.stderr
    assert not (tmp_path / "x").exists()


def test_dry_run_and_print_config_write_nothing(tmp_path, capsys):
    assert main(["--config", DEV, "--dry-run", "model.width=48", "--output-dir", str(tmp_path / "dry")]) == 0
    out = capsys.readouterr().out
    assert "width: 48" in out and "dry run ok" in out
    assert not (tmp_path / "dry").exists()  # a dry run writes nothing
    assert main(["--config", DEV, "--print-config", "optim.lr=0.5"]) == 0
    assert "lr: 0.5" in capsys.readouterr().out


def test_architecture_change_message_names_values(finished_run, capsys):
    code = main(["--output-dir", str(finished_run), "--resume", "auto", "seeds.num_seeds=2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "seeds.num_seeds" in err and "checkpoint has 1" in err and "config has 2" in err


def test_resume_completed_run_without_config_uses_its_config(finished_run):
    # Nothing left to train: a resume of a finished run re-validates and exits cleanly.
    before = tree_digest(finished_run / "checkpoints")
    assert main(["--output-dir", str(finished_run), "--resume", "auto", "--dry-run"]) == 0
    assert tree_digest(finished_run / "checkpoints") == before



@pytest.mark.integration
def test_export_matches_the_trained_model(finished_run, tmp_path):
    from safetensors.torch import load_file

    import esper.kasmina  # noqa: F401  (the exported program calls torch.ops.esper.*)
    from esper.tolaria.export import main as export_main
    from esper.tolaria.export import rebuild_model, unwrap_dormant

    out = tmp_path / "export"
    assert export_main([str(finished_run), "--output-dir", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verification"]["max_abs_diff"] <= 1e-5
    assert any(s["blueprint"] for s in manifest["seeds"])  # the grown seed is part of the export
    program = torch.export.load(str(out / "program.pt2"))
    model, shape = rebuild_model(ckpt.load_checkpoint(finished_run))
    model = unwrap_dormant(model)  # as exported: seed sites with nothing in their forward are plain modules
    x = torch.randn(33, *shape)
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model(x), atol=1e-6)
    weights = load_file(str(out / "weights.safetensors"))
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    assert weights.keys() == state.keys()
    for k in state:  # bitwise, NaN == NaN (an unmeasured contribution is stored as NaN)
        torch.testing.assert_close(weights[k], state[k], rtol=0, atol=0, equal_nan=True)
    assert manifest["parameters"] == sum(p.numel() for p in model.parameters())


@pytest.mark.integration
def test_governor_rolls_back_a_diverging_run(tmp_path):
    # A learning rate far too high makes the loss blow up; the governor restores the epoch-start
    # snapshot instead of letting NaN weights through, and the run still finishes.
    out = tmp_path / "diverge"
    code = main(["--config", DEV, "--output-dir", str(out), "--progress", "plain", "train.epochs=4",
                 "optim.lr=1e12", "schedule.warmup_epochs=0", *FAST])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rollbacks"] > 0
    # The host diverged on its own: the seeds in flight are TRAINING (straight-through, the output is
    # exactly the host's), so none is blamed; test_governor_blames_only_blended_seeds covers blame.
    assert "rolled_back" not in {a["outcome"] for a in summary["adaptations"]}
    model_state = ckpt.load_checkpoint(out)["model"]
    for key, value in model_state.items():  # table.contribution uses NaN for "never measured"
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not key.endswith("contribution"):
            assert torch.isfinite(value).all(), key
    assert any(r.get("rollback") for r in read_metrics(out, "event"))


def test_governor_blames_only_blended_seeds(tmp_path):
    from esper.lifecycle import SeedLifecycleState as S
    from esper.tolaria.config import load_config
    from esper.tolaria.trainer import Trainer

    # 4 epochs: a seed germinated now can still finish (no germination that cannot)
    cfg = load_config(DEV, ["train.epochs=4", "services.mode=off", *FAST])
    trainer = Trainer(cfg, tmp_path / "run", progress="none")
    trainer.prepare()
    trainer.start()
    try:
        morph = trainer.morph
        (name, layer), (name2, layer2) = morph.driver.sites[:2]
        for site in (name, name2):
            morph.apply_decision(common_pb2.AdaptationDecision(
                layer_name=site, seed_index=0, blueprint_id="residual_mlp",
                action=common_pb2.DECISION_ACTION_GERMINATE), 1)
        assert layer.state_of(0) == layer2.state_of(0) == S.TRAINING  # germinated without services
        layer2.transition(0, S.GRAFTING, "test")
        assert morph.lifecycle_changed  # the trainer re-takes the governor's snapshot after this
        # The most recent adaptation (site 2) blends into the output, so it is the one blamed ...
        assert morph.roll_back_culprit(0, 1, "spike") == f"{name2}[0]"
        assert layer2.state_of(0) == S.DORMANT and not layer2.seed_parameters(0)  # rolled back, slot freed
        # ... and a TRAINING seed (output exactly the host's) is never blamed.
        assert morph.roll_back_culprit(0, 1, "spike") is None
        assert layer.state_of(0) == S.TRAINING
    finally:
        trainer.metrics.close()


def test_governor_spike_needs_an_absolute_excess():
    from esper.tolaria.config import GovernorConfig
    from esper.tolaria.governor import Governor

    gov = Governor(GovernorConfig(spike_warmup_steps=5))
    for _ in range(30):
        assert gov.anomaly(0.001) is None
    assert gov.anomaly(0.005) is None  # 5 x and many sd above a converged loss, but 0.004 nats is noise
    assert "spike" in gov.anomaly(3.0)  # a real divergence still fires
    assert "non-finite" in gov.anomaly(float("nan"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is missing")
def test_cuda_requested_without_cuda_is_a_usage_error(tmp_path, capsys):
    assert main(["--config", DEV, "--device", "cuda", "--output-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "train.device: 'cuda' was requested but no CUDA device is available" in err
    assert not (tmp_path / "x").exists()


def test_germination_keeps_the_host_optimizer_state(tmp_path):
    from esper.tolaria.config import load_config
    from esper.tolaria.report import ProgressDisplay
    from esper.tolaria.trainer import Trainer

    # 4 epochs: a seed germinated after the first can still finish (no germination that cannot)
    cfg = load_config(DEV, ["train.epochs=4", "controller.start_epoch=0", *FAST])
    trainer = Trainer(cfg, tmp_path / "run", progress="none")
    trainer.prepare()
    trainer.start()
    trainer._train_epoch(0, ProgressDisplay("none", 3, trainer.steps_per_epoch, False))
    host_params = trainer.optimizer.param_groups[0]["params"]
    before = {i: trainer.optimizer.state[p]["momentum_buffer"].clone() for i, p in enumerate(host_params)}
    val_loss, val_acc = trainer.evaluate(trainer.data.val)
    growth = trainer.morph.epoch_end(epoch=0, global_step=trainer.state.global_step, total_epochs=3, train_loss=1.0,
                                     val_loss=val_loss, val_acc=val_acc, history=[val_loss],
                                     evaluate=trainer._counterfactual_eval)
    trainer._apply_growth(growth)
    assert len(growth.added_groups) == 1  # a seed germinated and its parameters joined the optimizer
    names = [g["name"] for g in trainer.optimizer.param_groups]
    assert names[0] == "host" and names[1].startswith("seed:")
    assert trainer.optimizer.param_groups[0]["params"] == host_params
    for i, p in enumerate(host_params):  # the host's momentum survived the growth untouched
        assert torch.equal(trainer.optimizer.state[p]["momentum_buffer"], before[i])
    trainer.metrics.close()


@pytest.mark.integration
def test_early_stopping_ends_the_run(tmp_path):
    out = tmp_path / "es"
    # A learning rate of ~0 cannot improve the validation loss, so patience 1 stops after epoch 2.
    assert main(["--config", DEV, "--output-dir", str(out), "--progress", "plain", "train.epochs=6",
                 "optim.lr=1e-12", "train.early_stopping_patience=1", "--no-morphogenetic", *FAST]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early"] is True and summary["epochs"] < 6
    assert ckpt.latest_checkpoint(out).name == f"epoch_{summary['epochs']:04d}"
