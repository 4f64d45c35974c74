"""Offline AWR training from replay files: bad input is refused clearly, the split is by run, and the
learned policy prefers the logged actions that paid."""

from __future__ import annotations

import random

import pytest

from esper.tamiyo.gnn_policy import GNNPolicy
from esper.tamiyo.offline import ReplayDataError, TrainSettings, load_replay, split_by_run, train
from esper.tamiyo.policy import RailsConfig, make_decision
from esper.tamiyo.policy_store import load_policy
from esper.tamiyo.replay import FILE_NAME, ReplayBuffer
from esper.tamiyo.reward import REWARD_DEFINITION
from esper.tamiyo.train_cli import main as train_main
from esper.v1 import common_pb2
from tests.tamiyo.policy_helpers import chain_graph

GERMINATE = common_pb2.DECISION_ACTION_GERMINATE
WAIT = common_pb2.DECISION_ACTION_WAIT


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sick_graph(run_id: str, sick: int, epoch: int = 3) -> common_pb2.ModelGraphState:
    """Three dormant sites; site `sick` has most of its units dead."""
    graph = chain_graph(run_id=run_id, epoch=epoch)
    for i, node in enumerate(graph.nodes):
        node.seed.telemetry.dead_fraction = 0.8 if i == sick else 0.05
    return graph


def report(graph, action, layer="", blueprint="", reward=0.0, definition=REWARD_DEFINITION):
    d = make_decision(action, "logged", "test", layer=layer, blueprint=blueprint)
    r = common_pb2.FieldReport(run_id=graph.run_id, decision=d, reward=reward, reward_definition=definition,
                               outcome=common_pb2.ADAPTATION_OUTCOME_PENDING, epoch=graph.signals.epoch)
    r.graph.CopyFrom(graph)
    return r


def write(directory, reports):
    buffer = ReplayBuffer(directory)
    for r in reports:
        buffer.append(r)
    buffer.close()


def logged_data(runs: int, seed: int = 0):
    """Growing the sick site pays (+2 points), growing a healthy one costs (-1), waiting is 0."""
    rng = random.Random(seed)
    out = []
    for run in range(runs):
        for epoch in range(1, 5):
            sick = rng.randrange(3)
            graph = sick_graph(f"run-{run}", sick, epoch)
            for site in range(3):
                out.append(report(graph, GERMINATE, f"hidden.{site}", "residual_mlp",
                                  reward=2.0 if site == sick else -1.0))
            out.append(report(graph, WAIT))
    return out


def test_bad_and_foreign_replay_files_are_refused(tmp_path, capsys):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / FILE_NAME).write_bytes(b"PK\x03\x04 this is a zip file, not field reports" * 4)
    with pytest.raises(ReplayDataError, match="not a Tamiyo replay file"):
        load_replay([tmp_path / "foreign"])
    assert train_main(["--replay", str(tmp_path / "foreign"), "--out", str(tmp_path / "p")]) == 2
    assert "not a Tamiyo replay file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReplayDataError, match="no field_reports.bin"):
        load_replay([tmp_path / "empty"])
    write(tmp_path / "other", [report(sick_graph("r", 0), WAIT, definition="accuracy-only/7")])
    with pytest.raises(ReplayDataError, match="'accuracy-only/7'"):
        load_replay([tmp_path / "other"])
    # Reports of ordinary runs (no graph, no reward) are skipped; with nothing else, that is an error.
    plain = common_pb2.FieldReport(run_id="r", outcome=common_pb2.ADAPTATION_OUTCOME_FOSSILIZED)
    write(tmp_path / "plain", [plain])
    with pytest.raises(ReplayDataError, match="no usable field report.*'no_graph': 1"):
        load_replay([tmp_path / "plain"])


def test_split_is_by_run_and_the_learned_policy_prefers_what_paid(tmp_path):
    write(tmp_path / "replay", logged_data(runs=24))
    data = load_replay([tmp_path / "replay"])
    assert len(data.samples) == 24 * 4 * 4 and len(data.runs) == 24
    train_runs, val_runs = split_by_run(data.runs, 0.25, seed=0)
    assert not train_runs & val_runs and len(val_runs) == 6 and train_runs | val_runs == set(data.runs)
    assert split_by_run(data.runs, 0.25, seed=0) == (train_runs, val_runs)
    model, rep = train(data, TrainSettings(epochs=25, hidden=16, layers=2, lr=1e-2, val_fraction=0.25, beta=0.5))
    assert rep["data"]["train_runs"] == 18 and rep["data"]["val_runs"] == 6
    assert set(rep["data"]["val_run_ids"]) == val_runs
    from esper.tamiyo.policy_store import save_policy

    save_policy(tmp_path / "policy", model, training_data_sha256=data.data_sha256, training=rep, metrics={})
    policy = GNNPolicy(load_policy(tmp_path / "policy"), RailsConfig(parameter_budget=2.0, compute_budget=2.0))
    picks = []
    for sick in (0, 1, 2, 1, 0, 2):
        (d,) = policy.decide(sick_graph("fresh", sick))
        picks.append(d.action == GERMINATE and d.layer_name == f"hidden.{sick}")
    assert sum(picks) >= 5, picks
    assert load_policy(tmp_path / "policy").manifest["training_data_sha256"] == data.data_sha256


def test_cli_writes_policy_report_and_tensorboard(tmp_path, capsys):
    write(tmp_path / "replay", logged_data(runs=6))
    rc = train_main(["--replay", str(tmp_path / "replay"), "--out", str(tmp_path / "p"), "--epochs", "2",
                     "--hidden", "8", "--layers", "2", "--tensorboard", str(tmp_path / "tb"), "--progress", "plain",
                     "--version", "gnn-test-1"])
    out = capsys.readouterr().out
    assert rc == 0 and "epoch 2/2" in out and "Tamiyo policy gnn-test-1" in out
    assert load_policy(tmp_path / "p").version == "gnn-test-1"
    assert (tmp_path / "p" / "train_report.json").is_file()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert train_main(["--replay", str(tmp_path / "replay"), "--out", str(tmp_path / "q"), "--layers", "7"]) == 2
    assert "--layers=7 is out of range" in capsys.readouterr().err
