"""esper-train under torchrun (gloo, 2 ranks on this machine) against one process with the same
global batch: the same losses, the same seed lifecycle at the same steps, exact resume on another
number of ranks, and a killed rank that stops the job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from esper.tolaria.cli import main
from esper.tolaria.loggers import read_metrics

REPO = Path(__file__).resolve().parents[2]
DEV = str(REPO / "configs" / "development.yaml")
# Plain SGD (the momentum of development.yaml at lr 0.05 makes the run chaotic enough that float
# rounding of a split batch grows past 1e-4 within 100 steps); min_contribution -1 fossilizes every
# seed that reaches the gate, so a seed germinates at step 35 and fossilizes at step 140.
RUN = ["--config", DEV, "--progress", "plain", "train.epochs=7", "model.width=32", "optim.momentum=0.0", "optim.lr=0.2",
       "lifecycle.min_contribution=-1.0", "checkpoint.keep_last=10", "data.batch_size=32",
       "logging.tensorboard=false", "logging.timeline_plot=false", "services.mode=off", "services.tolaria_port=-1"]
STEPS = 200


def run_ranks(nproc: int, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "esper.tolaria.cli", "--nproc", str(nproc), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def step_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, "step")}


def lifecycle(run_dir: Path) -> list[tuple]:
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return [(e["step"], e["layer"], e["seed"], e["from"], e["to"]) for e in events]


def assert_same_curve(reference: dict[int, float], other: dict[int, float], steps) -> None:
    worst = max(abs(other[s] - reference[s]) / abs(reference[s]) for s in steps)
    assert worst < 1e-4, f"per-step losses differ by up to {worst:.3g} (relative)"


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> Path:
    """The reference: one process, global batch 32."""
    out = tmp_path_factory.mktemp("one") / "run"
    assert main([*RUN, "--output-dir", str(out), "train.torch_threads=1"]) == 0
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """Two gloo ranks with batch 16 each (global batch 32)."""
    out = tmp_path_factory.mktemp("two") / "run"
    proc = run_ranks(2, *RUN, "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.integration
def test_two_ranks_follow_one_process_with_the_same_global_batch(one_rank, two_ranks):
    ref, two = step_losses(one_rank), step_losses(two_ranks)
    assert len(two) == len(ref) == 245
    assert_same_curve(ref, two, range(1, STEPS + 1))
    # the same adaptations at the same steps, one germinating and fossilizing mid-run
    assert lifecycle(two_ranks) == lifecycle(one_rank)
    path = [(step, to) for step, layer, _, _, to in lifecycle(two_ranks) if layer == "hidden.1"]
    assert path[0] == (35, "GERMINATED") and path[-1] == (140, "FOSSILIZED")
    a, b = (json.loads((d / "summary.json").read_text()) for d in (one_rank, two_ranks))
    assert [(x["epoch"], x["layer"], x["blueprint"], x["outcome"]) for x in b["adaptations"]] == \
        [(x["epoch"], x["layer"], x["blueprint"], x["outcome"]) for x in a["adaptations"]]
    assert b["seeds"] == a["seeds"] and b["seeds"].get("fossilized", 0) >= 1
    assert abs(b["final_val_acc"] - a["final_val_acc"]) <= 0.005 and a["final_val_acc"] > 0.8
    assert b["params_final"] == a["params_final"] > a["params_initial"]
    assert b["ranks"]["world_size"] == 2 and b["ranks"]["backend"] == "gloo"


@pytest.mark.integration
def test_every_rank_holds_the_same_model_after_every_epoch(two_ranks):
    checks = json.loads((two_ranks / "summary.json").read_text())["ranks"]["replica_digests"]
    assert [c["epoch"] for c in checks] == list(range(1, 8))
    for check in checks:
        assert len(check["ranks"]) == 2 and check["ranks"][0] == check["ranks"][1]
    assert len({c["ranks"][0] for c in checks}) == 7  # the digest really covers the changing model


@pytest.mark.integration
def test_a_two_rank_checkpoint_resumes_on_one_rank(one_rank, two_ranks, tmp_path):
    ckpt_dir = two_ranks / "checkpoints" / "epoch_0003"  # hidden.0's seed is mid-lifecycle here
    out = tmp_path / "resumed"
    assert main(["--resume", str(ckpt_dir), "--output-dir", str(out), "--progress", "none",
                 "train.torch_threads=1"]) == 0
    resumed = step_losses(out)
    assert min(resumed) == 106 and max(resumed) == 245
    assert_same_curve(step_losses(two_ranks), resumed, range(106, STEPS + 1))
    assert_same_curve(step_losses(one_rank), resumed, range(106, STEPS + 1))
    assert [e for e in lifecycle(out) if e[0] > 105] == [e for e in lifecycle(one_rank) if e[0] > 105]


def _rank_pid(marker: str, rank: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in cmdline and f"RANK={rank}".encode() in environ and b"torch.distributed.run" not in cmdline:
            return int(entry.name)
    return None


@pytest.mark.slow
@pytest.mark.integration
def test_a_killed_rank_stops_the_job_and_resume_reproduces_the_curve(one_rank, tmp_path):
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "esper.tolaria.cli", "--nproc", "2", *RUN, "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "epoch_0002" / "COMPLETE").exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        pid = _rank_pid(str(out), rank=1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        elapsed = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert elapsed < 60
    assert "the 2-rank job failed" in stderr and "--resume auto" in stderr
    assert not (out / "summary.json").exists()

    resumed = run_ranks(2, "--resume", "auto", "--output-dir", str(out), "--progress", "none")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert_same_curve(step_losses(one_rank), step_losses(out), range(1, STEPS + 1))
    assert lifecycle(out) == lifecycle(one_rank)


@pytest.mark.slow
@pytest.mark.integration
def test_two_ranks_with_local_services_adopt_the_kernels_rank_0_attaches(tmp_path):
    # Only rank 0 talks to Tamiyo/Tezzeret/Urza/Oona; its kernels arrive between steps at a moment
    # no other rank can predict, and the others adopt the seed at the same step (the per-epoch
    # replica check would stop the run otherwise).
    out = tmp_path / "services"
    proc = run_ranks(2, "--config", DEV, "--output-dir", str(out), "--progress", "plain", "train.epochs=30",
                     "services.mode=local", "services.cpus=off", "lifecycle.germination_timeout_epochs=40",
                     "lifecycle.min_contribution=-1.0", "logging.tensorboard=false", "logging.timeline_plot=false",
                     timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    attached = [e for e in (json.loads(line) for line in (out / "events.jsonl").read_text().splitlines())
                if e["to"] == "TRAINING" and "kernel" in e["reason"]]
    assert attached, f"no compiled kernel was attached during the run:\n{proc.stdout[-3000:]}"
    checks = summary["ranks"]["replica_digests"]
    assert len(checks) == 30 and all(c["ranks"][0] == c["ranks"][1] for c in checks)
    assert summary["services"]["mode"] == "local"


@pytest.mark.slow
@pytest.mark.integration
def test_checkpoint_and_stop_requests_to_rank_0_stop_every_rank_at_one_step(tmp_path):
    # The Tolaria server runs on rank 0 only: a checkpoint it writes on request must not wait for
    # the other ranks, and a Stop must end every rank after the same step.
    from esper.serving import open_sync_channel
    from esper.tolaria import checkpoint as ckpt
    from esper.v1 import tolaria_pb2, tolaria_pb2_grpc

    out = tmp_path / "served"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "esper.tolaria.cli", "--nproc", "2", "--config", DEV, "--output-dir", str(out),
           "--progress", "none", "train.epochs=400", "services.mode=off", "logging.tensorboard=false",
           "logging.timeline_plot=false"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        address_file = out / "services" / "tolaria.address"
        deadline = time.monotonic() + 180
        while not address_file.exists() or not (out / "checkpoints").exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no Tolaria server address within 180 s"
            time.sleep(0.1)
        with open_sync_channel(address_file.read_text().strip()) as channel:
            stub = tolaria_pb2_grpc.TolariaServiceStub(channel)
            reply = stub.RequestCheckpoint(tolaria_pb2.RequestCheckpointRequest(tag="test"), timeout=60)
            assert ckpt.is_complete(ckpt.resolve_checkpoint(reply.checkpoint_path))
            stop_step = stub.Stop(tolaria_pb2.StopRequest(reason="test says stop"), timeout=60).global_step
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by_request"] is True and summary["global_step"] == stop_step
    assert all(c["ranks"][0] == c["ranks"][1] for c in summary["ranks"]["replica_digests"])


@pytest.mark.slow
@pytest.mark.integration
def test_esper_bench_scale_reports_both_arms_with_the_same_curve(tmp_path):
    from esper.bench.cli import main as bench

    md, js = tmp_path / "scale.md", tmp_path / "scale.json"
    assert bench(["scale", "--ranks", "1,2", "--markdown", str(md), "--json", str(js), "train.epochs=2",
                  "optim.momentum=0.0", "data.batch_size=32"]) == 0
    fig = json.loads(js.read_text())
    assert [a["ranks"] for a in fig["arms"]] == [1, 2] and fig["cpu_count"] == os.cpu_count()
    one, two = fig["arms"]
    assert one["steps"] == two["steps"] == 70 and two["per_rank_batch"] == 16
    assert two["max_rel_step_loss_diff"] < 1e-4 and two["steps_per_s"] > 0
    assert abs(two["efficiency"] - two["steps_per_s"] / one["steps_per_s"] / 2) < 1e-9
    text = md.read_text()
    assert "esper-bench scale --ranks 1,2" in text and "| 2 | 2 of" in text and "Loss curve" in text
