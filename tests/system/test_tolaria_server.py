"""The Tolaria server inside a real esper-train process (services.mode off, so it is fast):
run status, metrics stream, live seed table, checkpoint on request, graceful Stop, and the Stop
checkpoint resumes."""

from __future__ import annotations

import grpc
import pytest

from esper.lifecycle import SeedLifecycleState as S
from esper.serving import open_sync_channel
from esper.tolaria import checkpoint as ckpt
from esper.v1 import tolaria_pb2, tolaria_pb2_grpc
from tests.system.helpers import DEV

pytestmark = pytest.mark.integration


def test_status_metrics_seeds_checkpoint_and_stop(tmp_path, train_process):
    run_dir = tmp_path / "run"
    # Long enough that only Stop ends it.
    proc = train_process(run_dir, "--config", DEV, "train.epochs=400", "logging.tensorboard=false",
                         "logging.timeline_plot=false", mode="off")
    address = proc.tolaria_address()
    with open_sync_channel(address) as channel:
        stub = tolaria_pb2_grpc.TolariaServiceStub(channel)
        # Metrics stream: step metrics while training, epoch metrics at boundaries.
        stream = stub.StreamMetrics(tolaria_pb2.StreamMetricsRequest(include_steps=True), timeout=120)
        scopes = set()
        steps = []
        for reply in stream:
            scopes.add(reply.metrics.scope)
            if reply.metrics.scope == "step":
                steps.append(reply.metrics.global_step)
                assert reply.metrics.values["loss"] > 0
            if scopes == {"step", "epoch"} and len(steps) > 40:
                break
        stream.cancel()
        assert steps == sorted(steps)
        status = stub.GetRunStatus(tolaria_pb2.GetRunStatusRequest(), timeout=10).status
        assert status.phase == tolaria_pb2.RUN_PHASE_TRAINING and status.global_step > 0
        assert status.total_epochs == 400 and status.output_dir == str(run_dir)
        # The seed table: one slot per hidden layer of the development MLP; the controller grows at once.
        proc.wait_for(lambda: any(e["to"] == "TRAINING" for e in proc.events()), 120, "a germinated seed")
        seeds = stub.ListSeeds(tolaria_pb2.ListSeedsRequest(), timeout=10).seeds
        assert len(seeds) == 2 and {s.layer_name for s in seeds} == {"hidden.0", "hidden.1"}
        assert any(s.state != S.DORMANT and s.blueprint_id for s in seeds)
        only = stub.ListSeeds(tolaria_pb2.ListSeedsRequest(layer_name="hidden.1"), timeout=10).seeds
        assert [s.layer_name for s in only] == ["hidden.1"]
        # A checkpoint on request, written at a step boundary.
        reply = stub.RequestCheckpoint(tolaria_pb2.RequestCheckpointRequest(tag="test"), timeout=60)
        assert ckpt.is_complete(ckpt.resolve_checkpoint(reply.checkpoint_path)) and reply.global_step > 0
        # Graceful stop: the step finishes, a checkpoint is written, the process exits 0.
        reply = stub.Stop(tolaria_pb2.StopRequest(reason="test says stop"), timeout=60)
        stop_step = reply.global_step
        assert stop_step > 0
    assert proc.wait(120) == 0, proc.output()[-3000:]
    payload = ckpt.load_checkpoint(ckpt.resolve_checkpoint(reply.checkpoint_path))
    assert payload["run_state"]["global_step"] == stop_step
    import json

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_by_request"] is True and summary["global_step"] == stop_step
    # The Stop checkpoint is usable: resume it for a few more steps.
    proc2 = train_process(run_dir, "--resume", "auto", f"train.max_steps={stop_step + 20}", mode="off")
    assert proc2.wait(300) == 0, proc2.output()[-3000:]
    assert f"step {stop_step})" in proc2.output()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == stop_step + 20


def test_stop_after_the_run_is_over_is_refused(tmp_path, train_process):
    run_dir = tmp_path / "short"
    proc = train_process(run_dir, "--config", DEV, "train.epochs=1", "logging.tensorboard=false", mode="off")
    address = proc.tolaria_address()
    assert proc.wait(300) == 0
    with open_sync_channel(address) as channel, pytest.raises(grpc.RpcError) as err:
        tolaria_pb2_grpc.TolariaServiceStub(channel).Stop(tolaria_pb2.StopRequest(), timeout=5)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION)
