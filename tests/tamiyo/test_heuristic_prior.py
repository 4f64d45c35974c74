"""The heuristic prior of the learned policy: field reports carry the heuristic's decision, the
offline trainer clones it where the logged rewards show nothing better, schema-3 site-order
features describe what the heuristic's rule reads, and policies of the previous schema are refused."""

from __future__ import annotations

import json
import random

import pytest

from esper.kasmina.growth.config import GrowthConfig
from esper.lifecycle import SeedLifecycleState as S
from esper.tamiyo import Controller, HeuristicConfig, HeuristicPolicy, SafetyRails
from esper.tamiyo.exploration import GrowthSpace, RandomPolicy
from esper.tamiyo.gnn_policy import GNNPolicy
from esper.tamiyo.graph import graph_to_data, node_feature_names
from esper.tamiyo.heuristic import VERSION as HEURISTIC_VERSION
from esper.tamiyo.offline import TrainSettings, load_replay, train
from esper.tamiyo.policy import RailsConfig, make_decision, wait
from esper.tamiyo.policy_store import MANIFEST, PolicyLoadError, load_policy, save_policy
from esper.tamiyo.recording import RecordingController, field_reports
from esper.tamiyo.replay import read_replay_file
from esper.tamiyo.reward import REWARD_DEFINITION
from esper.v1 import common_pb2
from tests.tamiyo.policy_helpers import chain_graph, with_growth_sites, write_policy
from tests.tamiyo.test_offline import sick_graph, write

GERMINATE = common_pb2.DECISION_ACTION_GERMINATE
WAIT = common_pb2.DECISION_ACTION_WAIT
RAILS = RailsConfig(parameter_budget=2.0, compute_budget=2.0, cooldown_epochs=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_reference_decision_round_trips_through_a_replay_file(tmp_path):
    # A random behaviour logs its own actions; the heuristic beside it is asked on the same graph.
    heuristic = HeuristicPolicy(HeuristicConfig(grow_without_plateau=True, start_epoch=1), RAILS, 20_000.0)
    explore = RandomPolicy(RAILS, seed=3, space=GrowthSpace())
    recorder = RecordingController(Controller(explore, SafetyRails(RAILS, 20_000.0)),
                                   reference=HeuristicPolicy(heuristic.cfg, RAILS, 20_000.0))
    graphs = [sick_graph("run-a", sick, epoch) for epoch, sick in ((1, 2), (2, 0), (3, 1))]
    for g in graphs:
        recorder.decide(g)
    summary = {"flops": {"forward_per_sample_initial": 20_000.0}, "adaptations": []}
    reports = field_reports(recorder.records, summary, train_samples=100, val_samples=20, total_epochs=12)
    write(tmp_path / "replay", reports)
    (back,) = [read_replay_file(p)[0] for p in (tmp_path / "replay").rglob("field_reports.bin")]
    assert len(back) == 3
    for g, r in zip(graphs, back, strict=True):
        want = heuristic.decide(g)[0]
        ref = r.reference_decision
        assert r.HasField("reference_decision") and ref.policy_version == HEURISTIC_VERSION
        assert (ref.action, ref.layer_name, ref.blueprint_id, ref.growth_mode) == (
            want.action, want.layer_name, want.blueprint_id, want.growth_mode)
    # Asked whatever the behaviour did: the references are growths even where the behaviour waited.
    assert all(r.reference_decision.action == GERMINATE for r in back)
    data = load_replay([tmp_path / "replay"])
    assert all(bool(s.has_ref) for s in data.samples)
    assert [f"hidden.{int(s.ref_node)}" for s in data.samples] == [r.reference_decision.layer_name for r in back]
    # A report without one (an older collection) has no cloning target.
    old = common_pb2.FieldReport()
    old.CopyFrom(reports[0])
    old.ClearField("reference_decision")
    write(tmp_path / "old", [old])
    assert not bool(load_replay([tmp_path / "old"]).samples[0].has_ref)


def _report(graph, decision, reward, reference):
    r = common_pb2.FieldReport(run_id=graph.run_id, decision=decision, reward=reward,
                               reward_definition=REWARD_DEFINITION, epoch=graph.signals.epoch,
                               outcome=common_pb2.ADAPTATION_OUTCOME_PENDING)
    r.graph.CopyFrom(graph)
    r.reference_decision.CopyFrom(reference)
    return r


def _uninformative_replay(runs: int, seed: int = 0, paying_site: int | None = None):
    """Logged actions with reward 0 (no advantage anywhere) that grow the healthy sites twice as
    often as the sick one, while the reference grows the sick site. With `paying_site`, growing
    that site logs +5 points instead."""
    rng = random.Random(seed)
    out = []
    for run in range(runs):
        for epoch in range(1, 5):
            sick = rng.randrange(3)
            graph = sick_graph(f"run-{run}", sick, epoch)
            reference = make_decision(GERMINATE, "ref", HEURISTIC_VERSION, layer=f"hidden.{sick}",
                                      blueprint="residual_mlp", growth_mode=common_pb2.GROWTH_MODE_BRANCH)
            healthy = [site for site in range(3) if site != sick]
            for site in (sick, *healthy, *healthy, None):
                if site is None:
                    logged, reward = wait("logged", "random/1"), 0.0
                else:
                    logged = make_decision(GERMINATE, "logged", "random/1", layer=f"hidden.{site}",
                                           blueprint="residual_mlp", growth_mode=common_pb2.GROWTH_MODE_BRANCH)
                    reward = 5.0 if site == paying_site else 0.0
                out.append(_report(graph, logged, reward, reference))
    return out


def _greedy_sites(model, data, tmp_path, name):
    save_policy(tmp_path / name, model, training_data_sha256=data.data_sha256, training={}, metrics={})
    policy = GNNPolicy(load_policy(tmp_path / name), RAILS)
    picks = []
    for sick in (0, 1, 2, 1, 0, 2):
        (d,) = policy.decide(sick_graph("fresh", sick))
        picks.append((sick, d.layer_name if d.action == GERMINATE else "wait"))
    return picks


def test_cloning_term_pulls_the_greedy_policy_to_the_reference(tmp_path):
    write(tmp_path / "flat", _uninformative_replay(runs=16))
    data = load_replay([tmp_path / "flat"])
    settings = dict(epochs=15, hidden=16, layers=2, lr=1e-2, val_fraction=0.25, beta=1.0)
    plain, plain_rep = train(data, TrainSettings(bc_weight=0.0, **settings))
    cloned, cloned_rep = train(data, TrainSettings(bc_weight=1.0, **settings))
    plain_hits = sum(site == f"hidden.{sick}" for sick, site in _greedy_sites(plain, data, tmp_path, "plain"))
    cloned_hits = sum(site == f"hidden.{sick}" for sick, site in _greedy_sites(cloned, data, tmp_path, "cloned"))
    # Rewards say nothing: AWR alone imitates the logger (healthy sites), the prior makes it the heuristic.
    assert cloned_hits >= 5 and cloned_hits > plain_hits, (plain_hits, cloned_hits)
    assert cloned_rep["best_metrics"]["val/ref_agreement"] > plain_rep["best_metrics"]["val/ref_agreement"]
    assert cloned_rep["best_metrics"]["val/ref_agreement"] >= 0.8
    assert "behaviour cloning" in cloned_rep["method"] and "behaviour cloning" not in plain_rep["method"]
    assert cloned_rep["data"]["samples_with_reference"] == len(data.samples)


def test_a_clearly_better_logged_action_overrides_the_reference(tmp_path):
    # Growing hidden.1 always pays +5 points; the reference grows the sick site. The data win.
    write(tmp_path / "paying", _uninformative_replay(runs=16, paying_site=1))
    data = load_replay([tmp_path / "paying"])
    model, _ = train(data, TrainSettings(epochs=15, hidden=16, layers=2, lr=1e-2, val_fraction=0.25, beta=1.0,
                                         bc_weight=1.0))
    picks = _greedy_sites(model, data, tmp_path, "p")
    assert sum(site == "hidden.1" for _sick, site in picks) >= 5, picks


def test_site_order_features_follow_the_heuristics_rule():
    g = with_growth_sites(chain_graph(states=(S.DORMANT, S.DORMANT, S.DORMANT, S.TRAINING)))
    for node, units in zip(g.nodes, (32, 16, 64, 8), strict=True):
        node.width.units = units  # hidden.1 is the narrowest free site; hidden.3 is narrower but busy
    g.nodes[2].width.input_dim = g.nodes[2].width.output_dim = 64  # not narrow: 64 units, 64 in and out
    data = graph_to_data(g, growth=GrowthConfig(modes=["branch", "width", "depth"]))
    names = node_feature_names()
    col = {n: i for i, n in enumerate(names)}
    x = data.x
    assert x[:, col["width_units_rel_max"]].tolist() == pytest.approx([0.5, 0.25, 1.0, 0.125])
    assert x[:, col["width_narrowest"]].tolist() == [0.0, 0.0, 0.0, 1.0]
    # Free sites hidden.0..2 (gradient norms 0.1, 0.2, 0.3; dead 0, 0.1, 0.2): need = grad / mean + dead.
    assert x[:, col["need_free"]].tolist() == pytest.approx([0.5, 1.1, 1.7, 0.0])
    # Narrow first (hidden.0 and .1, the neediest of them first), then hidden.2; the busy site has no rank.
    assert x[:, col["need_rank_free"]].tolist() == pytest.approx([2 / 3, 1.0, 1 / 3, 0.0])
    # The heuristic, narrow first by need, grows hidden.1 by width: the site ranked first.
    h = HeuristicPolicy(HeuristicConfig(grow_without_plateau=True, growth=GrowthConfig(
        modes=["branch", "width", "depth"])), RAILS, 20_000.0)
    (d,) = h.decide(g)
    assert d.layer_name == "hidden.1" and d.growth_mode == common_pb2.GROWTH_MODE_WIDTH
    # Every growth candidate carries its gain-per-FLOP prior; a wider site gets more parameters per FLOP.
    gain = [n for n in names if n.endswith(":log_gain_per_flop")]
    assert gain[-2:] == ["width:log_gain_per_flop", "depth:log_gain_per_flop"] and len(gain) == len(data.mask[0]) - 2
    assert x[:, col["width:log_gain_per_flop"]].abs().max() <= 2.0


def test_a_policy_of_feature_schema_2_is_refused(tmp_path):
    write_policy(tmp_path / "p")
    manifest = json.loads((tmp_path / "p" / MANIFEST).read_text())
    manifest["feature_schema"] = "tamiyo-graph/2"
    (tmp_path / "p" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PolicyLoadError, match=r"trained on feature schema 'tamiyo-graph/2'; this Tamiyo builds "
                                              r"'tamiyo-graph/3'; expected a policy retrained"):
        load_policy(tmp_path / "p")
