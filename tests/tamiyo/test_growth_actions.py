"""Width and depth growth in every policy's action space (since feature schema tamiyo-graph/2): the graph
describes and masks them by the run's growth modes, and the GNN, random and heuristic policies emit
them -- only when the run allows them. A real run shows them applied and the gradient alignment
telemetry arriving in the graph."""

from __future__ import annotations

import collections

import pytest

from esper.kasmina.growth.config import GrowthConfig
from esper.tamiyo import Controller, HeuristicConfig, HeuristicPolicy, SafetyRails
from esper.tamiyo.exploration import GrowthSpace, RandomPolicy, locate_action
from esper.tamiyo.gnn_policy import GNNPolicy
from esper.tamiyo.graph import action_names, graph_to_data, node_feature_names, width_column
from esper.tamiyo.policy import RailsConfig
from esper.tamiyo.policy_store import load_policy
from esper.v1 import common_pb2
from tests.tamiyo.policy_helpers import always_grow_gnn, chain_graph, with_growth_sites, write_policy

ALL = GrowthConfig(modes=["branch", "width", "depth"])
RAILS = RailsConfig(parameter_budget=2.0, compute_budget=2.0, cooldown_epochs=0)
WIDTH, DEPTH = common_pb2.GROWTH_MODE_WIDTH, common_pb2.GROWTH_MODE_DEPTH


def test_actions_and_features_cover_width_and_depth():
    names = action_names()
    assert names[-2:] == ["grow:width", "grow:depth"] and width_column() == len(names) - 2
    features = node_feature_names()
    for f in ("gradient_alignment", "has_gradient_alignment", "log2_width_units", "width_narrow", "depth_blocks",
              "width:params_rel", "width:in_budget", "depth:flops_rel", "depth:in_budget"):
        assert f in features, f
    g = with_growth_sites(chain_graph())
    g.nodes[1].seed.telemetry.gradient_alignment, g.nodes[1].seed.telemetry.has_gradient_alignment = 0.3, True
    data = graph_to_data(g, growth=ALL)
    w = width_column()
    assert data.mask[:, w].all() and data.mask[:, w + 1].all()
    assert data.width_units == [32, 32, 32]  # width_factor 1.0 doubles the 32 units
    x = dict(zip(features, data.x[1].tolist(), strict=True))
    assert x["gradient_alignment"] == pytest.approx(0.3) and x["has_gradient_alignment"] == 1.0
    assert x["width_narrow"] == 1.0 and x["width:params_rel"] == pytest.approx(32 * 129 / 10_000)
    assert x["depth:flops_rel"] == pytest.approx(2048 / 20_000)
    # Growth modes the run does not allow are masked; the features still describe them.
    branch_only = graph_to_data(g)
    assert not branch_only.mask[:, w:].any() and branch_only.x.tolist() == data.x.tolist()
    # A budget too small for 32 units shrinks the width action to what fits; depth does not fit at all.
    tight = graph_to_data(with_growth_sites(chain_graph(budget_left=0.05)),
                          growth=GrowthConfig(modes=ALL.modes, width_units=32))
    assert tight.width_units == [7, 7, 7] and tight.mask[:, w].all() and not tight.mask[:, w + 1].any()
    with pytest.raises(ValueError, match=r"growth.modes has \['sideways'\]"):
        graph_to_data(g, growth=GrowthConfig(modes=["sideways"]))


@pytest.mark.parametrize(("action", "mode", "units"), [("grow:width", WIDTH, 4), ("grow:depth", DEPTH, 0)])
def test_gnn_emits_width_and_depth_growth_only_where_the_run_allows_it(tmp_path, action, mode, units):
    write_policy(tmp_path / "p", always_grow_gnn(action=action))
    loaded = load_policy(tmp_path / "p")
    g = with_growth_sites(chain_graph(epoch=5))
    space = GrowthSpace(growth=GrowthConfig(modes=ALL.modes, width_units=4))
    controller = Controller(GNNPolicy(loaded, RAILS, space), SafetyRails(RAILS, 20_000.0))
    (d,) = controller.decide(g)  # the rails let it through
    assert d.action == common_pb2.DECISION_ACTION_GERMINATE and (d.growth_mode, d.growth_units) == (mode, units)
    assert not d.blueprint_id and action in d.reason
    assert locate_action(g, d) == (0, action_names().index(action))
    (branch_only,) = GNNPolicy(loaded, RAILS, GrowthSpace()).decide(g)
    assert branch_only.growth_mode != mode


def test_random_policy_explores_every_allowed_mode_with_its_probability():
    g = with_growth_sites(chain_graph(epoch=5))
    policy = RandomPolicy(RAILS, seed=3, wait_probability=0.0, space=GrowthSpace(growth=ALL))
    seen = collections.Counter()
    for _ in range(120):
        (d,) = policy.decide(g)
        kind = {WIDTH: "width", DEPTH: "depth"}.get(d.growth_mode, "branch")
        seen[kind] += 1
        node, column = locate_action(g, d)
        assert policy.probability_of[d.decision_id] == pytest.approx(policy.action_probability(g, node, column))
    # Three kinds with a legal action (nothing to cull): each about a third of the time.
    assert set(seen) == {"branch", "width", "depth"} and min(seen.values()) >= 25, seen
    only_branch = RandomPolicy(RAILS, seed=3, wait_probability=0.0, space=GrowthSpace())
    assert {only_branch.decide(g)[0].growth_mode for _ in range(30)} == {common_pb2.GROWTH_MODE_BRANCH}


def test_heuristic_emits_depth_when_depth_is_the_mode_allowed():
    g = with_growth_sites(chain_graph(epoch=5))
    policy = HeuristicPolicy(HeuristicConfig(grow_without_plateau=True, growth=GrowthConfig(modes=["depth"])), RAILS,
                             20_000.0)
    (d,) = policy.decide(g)
    assert d.action == common_pb2.DECISION_ACTION_GERMINATE and d.growth_mode == DEPTH


@pytest.mark.integration
def test_a_real_run_applies_random_width_and_depth_growth_and_reports_alignment(tmp_path):
    from esper.tamiyo.collect import EpisodeSpec, _exploration_controller
    from esper.tamiyo.episodes import run_episode, task_config

    cfg = task_config("digits-mlp", "w16", 0, ("growth.modes=[branch,width,depth]",))
    episode = run_episode(cfg, tmp_path / "run", _exploration_controller(EpisodeSpec("digits-mlp", "w16", 4, "random")))
    modes = {a["mode"] for a in episode.summary["adaptations"]}
    assert {"width", "depth"} & modes, episode.summary["adaptations"]
    telemetry = [n.seed.telemetry for r in episode.records for n in r.graph.nodes]
    aligned = [t.gradient_alignment for t in telemetry if t.has_gradient_alignment]
    assert aligned and all(-1.0 <= a <= 1.0 for a in aligned)
