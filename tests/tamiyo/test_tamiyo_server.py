"""esper-tamiyo as a real server process on port 0: Decide, ReportOutcome (durable replay buffer
that survives a restart and a torn tail), GetPolicyInfo, bad input."""

from __future__ import annotations

import signal
import sys

import grpc
import pytest
import yaml

from esper.lifecycle import SeedLifecycleState as S
from esper.serving import ServerProcess, open_sync_channel
from esper.tamiyo.replay import ReplayBuffer
from esper.v1 import common_pb2, tamiyo_pb2, tamiyo_pb2_grpc

pytestmark = pytest.mark.integration


def graph(run_id="run-a", epoch=3, history=(1.0, 0.999, 0.998), flops=1e6) -> common_pb2.ModelGraphState:
    msg = common_pb2.ModelGraphState(run_id=run_id)
    for i, grad in enumerate((0.1, 0.5)):
        node = msg.nodes.add(node_id=f"hidden.{i}[0]", layer_name=f"hidden.{i}", layer_kind="linear", depth=i)
        node.output_shape.dims.extend([-1, 32])
        node.seed.layer_name = f"hidden.{i}"
        node.seed.state = int(S.DORMANT)
        node.seed.chunk_size = 32
        node.seed.telemetry.gradient_norm = grad
    sig = msg.signals
    sig.epoch = epoch
    sig.val_loss_history.extend(history)
    sig.initial_parameter_count = 10_000
    sig.parameter_budget_left = 1.0
    sig.compute_budget_left = 1.0
    sig.initial_flops_per_sample = flops
    return msg


def start(tmp_path, *extra):
    proc = ServerProcess([sys.executable, "-m", "services.tamiyo", "--port", "0", "--replay-dir",
                          str(tmp_path / "replay"), *extra], stderr_path=tmp_path / "tamiyo.log")
    proc.start()
    return proc


@pytest.fixture
def policy_file(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({"controller": {"policy": "heuristic", "start_epoch": 1, "cooldown_epochs": 2,
                                                   "max_concurrent": 1}, "seeds": {"blueprints": ["residual_mlp"]}}))
    return path


def test_decide_report_info_and_restart(tmp_path, policy_file):
    proc = start(tmp_path, "--policy-config", str(policy_file))
    try:
        with open_sync_channel(proc.address) as channel:
            stub = tamiyo_pb2_grpc.TamiyoServiceStub(channel)
            reply = stub.Decide(tamiyo_pb2.DecideRequest(graph=graph()), timeout=10)
            (d,) = reply.decisions
            assert d.action == common_pb2.DECISION_ACTION_GERMINATE
            assert d.layer_name == "hidden.1" and d.blueprint_id == "residual_mlp"
            assert reply.policy_version == "heuristic/4"
            # Rails keep per-run state on the server: the same run is in cooldown, another run is not.
            (again,) = stub.Decide(tamiyo_pb2.DecideRequest(graph=graph(epoch=4)), timeout=10).decisions
            assert again.action == common_pb2.DECISION_ACTION_WAIT and "cooldown" in again.reason
            (other,) = stub.Decide(tamiyo_pb2.DecideRequest(graph=graph(run_id="run-b", epoch=4)),
                                   timeout=10).decisions
            assert other.action == common_pb2.DECISION_ACTION_GERMINATE
            for outcome in (common_pb2.ADAPTATION_OUTCOME_FOSSILIZED, common_pb2.ADAPTATION_OUTCOME_CULLED):
                report = common_pb2.FieldReport(run_id="run-a", decision=d, outcome=outcome, contribution=0.02)
                report.telemetry_before.gradient_norm = 0.5
                r = stub.ReportOutcome(tamiyo_pb2.ReportOutcomeRequest(report=report), timeout=10)
                assert r.report_id
            assert r.replay_buffer_size == 2
            info = stub.GetPolicyInfo(tamiyo_pb2.GetPolicyInfoRequest(), timeout=10)
            assert info.policy_kind == "heuristic" and info.replay_buffer_size == 2
            assert info.rails["cooldown_epochs"] == "2" and info.rails["max_concurrent"] == "1"
            # Bad input: INVALID_ARGUMENT naming the field, and the server keeps serving.
            with pytest.raises(grpc.RpcError) as err:
                stub.Decide(tamiyo_pb2.DecideRequest(graph=graph(flops=0)), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "initial_flops_per_sample" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                stub.ReportOutcome(tamiyo_pb2.ReportOutcomeRequest(report=common_pb2.FieldReport()), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "decision_id" in err.value.details()
            assert stub.GetPolicyInfo(tamiyo_pb2.GetPolicyInfoRequest(), timeout=10).replay_buffer_size == 2
        # A hard kill: acknowledged reports were fsync'd and survive.
        proc.process.send_signal(signal.SIGKILL)
        proc.process.wait(timeout=10)
    finally:
        proc.stop()
    # Simulate a crash mid-append: a torn record at the end is cut on the next start.
    with (tmp_path / "replay" / "field_reports.bin").open("ab") as fh:
        fh.write(b"\x00\x00\x01\x00garbage")
    proc = start(tmp_path, "--policy-config", str(policy_file))
    try:
        with open_sync_channel(proc.address) as channel:
            stub = tamiyo_pb2_grpc.TamiyoServiceStub(channel)
            assert stub.GetPolicyInfo(tamiyo_pb2.GetPolicyInfoRequest(), timeout=10).replay_buffer_size == 2
            # The rails state of each run survived the kill: run-a is still in its cooldown.
            (again,) = stub.Decide(tamiyo_pb2.DecideRequest(graph=graph(epoch=4)), timeout=10).decisions
            assert again.action == common_pb2.DECISION_ACTION_WAIT and "cooldown" in again.reason
            (new,) = stub.Decide(tamiyo_pb2.DecideRequest(graph=graph(run_id="run-c", epoch=4)), timeout=10).decisions
            assert new.action == common_pb2.DECISION_ACTION_GERMINATE
            report = common_pb2.FieldReport(run_id="run-a", decision=d,
                                            outcome=common_pb2.ADAPTATION_OUTCOME_COMPILE_FAILED)
            assert stub.ReportOutcome(tamiyo_pb2.ReportOutcomeRequest(report=report),
                                      timeout=10).replay_buffer_size == 3
    finally:
        assert proc.stop() == 0
    buffer = ReplayBuffer(tmp_path / "replay")
    outcomes = [r.outcome for r in buffer]
    assert outcomes == [common_pb2.ADAPTATION_OUTCOME_FOSSILIZED, common_pb2.ADAPTATION_OUTCOME_CULLED,
                        common_pb2.ADAPTATION_OUTCOME_COMPILE_FAILED]
    assert all(r.decision.decision_id == d.decision_id for r in buffer)
    buffer.close()


def test_bad_policy_config_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cooldown_epochs: soon\n")
    proc = ServerProcess([sys.executable, "-m", "services.tamiyo", "--port", "0", "--replay-dir",
                          str(tmp_path / "r"), "--policy-config", str(bad)], stderr_path=tmp_path / "log")
    with pytest.raises(Exception, match="exited with code 2"):
        proc.start()
    assert "cooldown_epochs expected int" in (tmp_path / "log").read_text()


def test_replay_buffer_cuts_corrupt_tail(tmp_path):
    buffer = ReplayBuffer(tmp_path)
    for i in range(3):
        buffer.append(common_pb2.FieldReport(report_id=str(i), outcome=common_pb2.ADAPTATION_OUTCOME_CULLED))
    buffer.close()
    path = tmp_path / "field_reports.bin"
    data = path.read_bytes()
    path.write_bytes(data[:-3])  # the last record torn
    buffer = ReplayBuffer(tmp_path)
    assert len(buffer) == 2 and buffer.truncated_bytes > 0
    assert [r.report_id for r in buffer] == ["0", "1"]
    buffer.append(common_pb2.FieldReport(report_id="3", outcome=common_pb2.ADAPTATION_OUTCOME_CULLED))
    buffer.close()
    assert [r.report_id for r in ReplayBuffer(tmp_path)] == ["0", "1", "3"]


def test_policy_config_from_a_whole_tolaria_config_takes_its_growth_section(tmp_path):
    from esper.kasmina.growth.config import GrowthConfig
    from esper.tolaria.config import load_config, to_dict
    from services.tamiyo.__main__ import load_policy_settings

    run = to_dict(load_config(None, ["growth.modes=[width, branch]", "growth.width_units=6",
                                     "controller.max_concurrent=2"]))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(run))
    settings = load_policy_settings(path)
    assert settings.growth == GrowthConfig(modes=["width", "branch"], width_units=6) and settings.max_concurrent == 2
    # A run's config.yaml from before the growth section joined the controller: its flat keys were
    # never used by Tolaria (growth.* won), and the run's growth section is what Tamiyo reads.
    run["controller"].update(growth_modes=["branch"], width_units=0, width_factor=1.0)
    path.write_text(yaml.safe_dump(run))
    assert load_policy_settings(path).growth == GrowthConfig(modes=["width", "branch"], width_units=6)
