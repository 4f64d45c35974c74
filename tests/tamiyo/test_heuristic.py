"""Heuristic Tamiyo policy and safety rails on hand-built ModelGraphState messages."""

from __future__ import annotations

from esper.kasmina.growth.config import GrowthConfig
from esper.lifecycle import SeedLifecycleState as S
from esper.tamiyo import Controller, HeuristicConfig, HeuristicPolicy, RailsConfig, SafetyRails, plateau
from esper.tamiyo.costs import blueprint_costs_at
from esper.v1 import common_pb2

GERMINATE = common_pb2.DECISION_ACTION_GERMINATE
WAIT = common_pb2.DECISION_ACTION_WAIT
HOST_FLOPS = 1e6


def graph(history, grads=(0.1, 0.5, 0.2), dead=(0.0, 0.0, 0.0), states=None, epoch=5,
          params_left=1.0, flops_left=1.0, active=0, initial_params=10_000) -> common_pb2.ModelGraphState:
    msg = common_pb2.ModelGraphState(run_id="t")
    states = states or [S.DORMANT] * len(grads)
    for i, (g, d, s) in enumerate(zip(grads, dead, states, strict=True)):
        node = msg.nodes.add(node_id=f"hidden.{i}[0]", layer_name=f"hidden.{i}", layer_kind="linear", depth=i)
        node.output_shape.dims.extend([-1, 32])
        node.seed.layer_name = f"hidden.{i}"
        node.seed.state = int(s)
        node.seed.chunk_size = 32
        node.seed.telemetry.gradient_norm = g
        node.seed.telemetry.dead_fraction = d
    sig = msg.signals
    sig.epoch = epoch
    sig.val_loss_history.extend(history)
    sig.initial_parameter_count = initial_params
    sig.parameter_budget_left = params_left
    sig.compute_budget_left = flops_left
    sig.active_adaptations = active
    return msg


def policy(**overrides) -> HeuristicPolicy:
    rails = RailsConfig(parameter_budget=1.0, compute_budget=1.0)
    return HeuristicPolicy(HeuristicConfig(**overrides), rails, HOST_FLOPS)


def test_plateau_detection():
    assert plateau([1.0, 0.99, 0.985], window=2, threshold=0.02) == (True, plateau([1.0, 0.99, 0.985], 2, 0.02)[1])
    assert plateau([1.0, 0.8, 0.6], window=2, threshold=0.02)[0] is False
    assert plateau([1.0], window=2, threshold=0.02)[0] is False


def test_waits_while_loss_improves_and_before_start():
    p = policy(start_epoch=2)
    (d,) = p.decide(graph([1.0, 0.7, 0.5], epoch=1))
    assert d.action == WAIT and "start_epoch" in d.reason
    (d,) = p.decide(graph([1.0, 0.7, 0.5]))
    assert d.action == WAIT and "no plateau" in d.reason


def test_grows_at_worst_health_site_on_plateau():
    (d,) = policy().decide(graph([1.0, 0.999, 0.998]))
    assert d.action == GERMINATE and d.layer_name == "hidden.1"  # largest relative gradient norm
    assert "plateau" in d.reason and d.blueprint_id
    (d,) = policy().decide(graph([1.0, 0.999, 0.998], grads=(0.1, 0.1, 0.1), dead=(0.0, 0.0, 0.9)))
    assert d.layer_name == "hidden.2"  # dead units dominate when gradients are even


def test_blueprint_is_the_largest_within_budget():
    msg = graph([1.0, 1.0, 1.0])
    costs = {c.blueprint_id: c for c in blueprint_costs_at(msg.nodes[0])}
    biggest = max(costs.values(), key=lambda c: c.parameters)
    (d,) = policy().decide(msg)
    assert d.blueprint_id == biggest.blueprint_id and d.growth_mode == common_pb2.GROWTH_MODE_BRANCH
    # Budget for only the cheapest blueprint: 10_000 params * fraction left.
    cheapest = min(costs.values(), key=lambda c: c.parameters)
    frac = (cheapest.parameters + 1) / 10_000
    (d,) = policy().decide(graph([1.0, 1.0, 1.0], params_left=frac))
    assert costs[d.blueprint_id].parameters <= cheapest.parameters + 1
    (d,) = policy().decide(graph([1.0, 1.0, 1.0], params_left=0.0))
    assert d.action == WAIT and "budget" in d.reason


def test_modes_compete_by_gain_per_flop_where_width_is_not_forced():
    import math

    wide = dict(units=64, input_dim=40, output_dim=10)   # not narrow, nothing dead
    msg = _with_width(graph([1.0, 1.0, 1.0]), unit_params=51, unit_flops=100, **wide)
    biggest = max(blueprint_costs_at(msg.nodes[0]), key=lambda c: c.parameters)
    (d,) = policy(growth=GrowthConfig(modes=["branch", "width"], width_units=8)).decide(msg)
    width_score = math.sqrt(8 * 51) / (8 * 100)
    branch_score = math.sqrt(biggest.parameters) / biggest.flops
    expected = common_pb2.GROWTH_MODE_WIDTH if width_score > branch_score else common_pb2.GROWTH_MODE_BRANCH
    assert d.growth_mode == expected and "gain per FLOP" in d.reason
    # Width too dear to fit the compute budget: the largest branch.
    msg = _with_width(graph([1.0, 1.0, 1.0]), unit_params=51, unit_flops=10**9, **wide)
    (d,) = policy(growth=GrowthConfig(modes=["branch", "width"], width_units=1)).decide(msg)
    assert d.growth_mode == common_pb2.GROWTH_MODE_BRANCH and d.blueprint_id == biggest.blueprint_id


def _with_width(msg, units=4, input_dim=40, output_dim=10, unit_params=51, unit_flops=100, available=True):
    for node in msg.nodes:
        node.width.CopyFrom(common_pb2.WidthSite(units=units, input_dim=input_dim, output_dim=output_dim,
                                                 unit_parameters=unit_params, unit_flops=unit_flops,
                                                 available=available))
    return msg


def test_width_growth_is_chosen_at_a_narrow_site():
    (d,) = policy(growth=GrowthConfig(modes=["branch", "width"])).decide(_with_width(graph([1.0, 1.0, 1.0])))
    assert d.action == GERMINATE and d.growth_mode == common_pb2.GROWTH_MODE_WIDTH
    assert d.growth_units == 4 and not d.blueprint_id and "narrow" in d.reason
    (d,) = policy(growth=GrowthConfig(modes=["branch", "width"], width_units=3)).decide(_with_width(graph([1.0, 1.0, 1.0])))
    assert d.growth_units == 3


def test_a_narrow_site_is_widened_before_a_less_healthy_wide_one():
    # hidden.1 has the worst health (largest gradient, many dead), but hidden.0 is the bottleneck:
    # 16 units reading 40 features and feeding 32. Width growth widens the bottleneck first.
    msg = _with_width(graph([1.0, 1.0, 1.0], grads=(0.1, 0.5), dead=(0.0, 0.6)), units=32, input_dim=16, output_dim=10)
    msg.nodes[0].width.CopyFrom(common_pb2.WidthSite(units=16, input_dim=40, output_dim=32, unit_parameters=73,
                                                     unit_flops=144, available=True))
    (d,) = policy(growth=GrowthConfig(modes=["width"])).decide(msg)
    assert d.layer_name == "hidden.0" and d.growth_mode == common_pb2.GROWTH_MODE_WIDTH
    assert "narrowest bottleneck" in d.reason and "narrow: 16 units < min(40 in, 32 out)" in d.reason
    # Branch growth cannot widen a layer: then the worst health decides, as before.
    (d,) = policy(growth=GrowthConfig(modes=["branch"])).decide(msg)
    assert d.layer_name == "hidden.1" and "worst health" in d.reason


def test_width_growth_at_a_saturated_site_and_only_when_allowed():
    wide = dict(units=64, input_dim=40, output_dim=10)
    msg = _with_width(graph([1.0, 1.0, 1.0], grads=(0.1, 0.1, 0.1), dead=(0.0, 0.0, 0.8)), **wide)
    (d,) = policy(growth=GrowthConfig(modes=["branch", "width"])).decide(msg)
    assert d.layer_name == "hidden.2" and d.growth_mode == common_pb2.GROWTH_MODE_WIDTH and "saturated" in d.reason
    (d,) = policy().decide(msg)  # default modes: branch only
    assert d.growth_mode == common_pb2.GROWTH_MODE_BRANCH and d.blueprint_id
    unavailable = _with_width(graph([1.0, 1.0, 1.0]), available=False)
    (d,) = policy(growth=GrowthConfig(modes=["width"])).decide(unavailable)
    assert d.action == WAIT


def test_width_units_shrink_to_the_budget_and_rails_cost_them():
    # 10_000 params * 0.01 = 100 params left: at 51 params per unit only 1 of the 4 units fits.
    msg = _with_width(graph([1.0, 1.0, 1.0], params_left=0.01))
    (d,) = policy(growth=GrowthConfig(modes=["width"])).decide(msg)
    assert d.growth_mode == common_pb2.GROWTH_MODE_WIDTH and d.growth_units == 1
    rails = SafetyRails(RailsConfig(parameter_budget=1.0), HOST_FLOPS)
    too_big = common_pb2.AdaptationDecision(action=GERMINATE, layer_name="hidden.0", seed_index=0,
                                            growth_mode=common_pb2.GROWTH_MODE_WIDTH, growth_units=3)
    (out,) = rails.filter(msg, [too_big])
    assert out.action == WAIT and "exceeds the budget" in out.reason
    no_pair = graph([1.0, 1.0, 1.0])
    (out,) = SafetyRails(RailsConfig(), HOST_FLOPS).filter(no_pair, [too_big])
    assert out.action == WAIT and "width growth does not fit" in out.reason


def test_allow_list_restricts_blueprints():
    (d,) = policy(blueprints=("lora_adapter",)).decide(graph([1.0, 1.0, 1.0]))
    assert d.blueprint_id == "lora_adapter"


def test_rails_cooldown_and_max_concurrent():
    rails_cfg = RailsConfig(cooldown_epochs=2, max_concurrent=1, max_adaptations=2)
    ctl = Controller(HeuristicPolicy(HeuristicConfig(grow_without_plateau=True), rails_cfg, HOST_FLOPS),
                     SafetyRails(rails_cfg, HOST_FLOPS))
    (d,) = ctl.decide(graph([1.0], epoch=3))
    assert d.action == GERMINATE
    grown = d.layer_name
    states = [S.TRAINING if f"hidden.{i}" == grown else S.DORMANT for i in range(3)]
    (d,) = ctl.decide(graph([1.0], epoch=4, states=states, active=0))
    assert d.action == WAIT and "cooldown" in d.reason
    (d,) = ctl.decide(graph([1.0], epoch=6, states=states, active=1))
    assert d.action == WAIT and "max_concurrent" in d.reason
    (d,) = ctl.decide(graph([1.0], epoch=6, states=states, active=0))
    assert d.action == GERMINATE
    (d,) = ctl.decide(graph([1.0], epoch=9, active=0))
    assert d.action == WAIT and "max_adaptations" in d.reason
    restored = SafetyRails(rails_cfg, HOST_FLOPS)
    restored.load_state_dict(ctl.rails.state_dict())
    assert restored.adaptations == 2 and restored.last_growth_epoch == 6


def test_rails_refuse_any_policy_over_budget():
    class Greedy:
        version = "greedy"

        def decide(self, state):
            return [common_pb2.AdaptationDecision(action=GERMINATE, layer_name="hidden.0", seed_index=0,
                                                  blueprint_id="residual_mlp", policy_version="greedy")]

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    rails_cfg = RailsConfig(parameter_budget=0.01)
    (d,) = Controller(Greedy(), SafetyRails(rails_cfg, HOST_FLOPS)).decide(graph([1.0]))
    assert d.action == WAIT and "exceeds the budget" in d.reason
    busy = graph([1.0], states=[S.FOSSILIZED, S.DORMANT, S.DORMANT])
    (d,) = Controller(Greedy(), SafetyRails(RailsConfig(), HOST_FLOPS)).decide(busy)
    assert d.action == WAIT and "not free" in d.reason


def test_compute_budget_limits_the_blueprint():
    msg = graph([1.0, 1.0, 1.0])
    costs = blueprint_costs_at(msg.nodes[0])
    cap = sorted(c.flops for c in costs)[1]  # room for the two cheapest only
    (d,) = HeuristicPolicy(HeuristicConfig(), RailsConfig(compute_budget=cap / 1000.0), 1000.0).decide(msg)
    chosen = next(c for c in costs if c.blueprint_id == d.blueprint_id)
    assert chosen.flops <= cap


def test_depth_growth_is_an_option_costed_by_the_rails():
    msg = graph([1.0, 1.0, 1.0])
    for node in msg.nodes:
        node.deepen.CopyFrom(common_pb2.DepthSite(blocks=0, block_parameters=1056, block_flops=2048, available=True))
    (d,) = policy(growth=GrowthConfig(modes=["depth"])).decide(msg)
    assert d.action == GERMINATE and d.growth_mode == common_pb2.GROWTH_MODE_DEPTH and "new block" in d.reason
    rails = SafetyRails(RailsConfig(parameter_budget=0.05), HOST_FLOPS)   # 500 params left
    (out,) = rails.filter(msg, [d])
    assert out.action == WAIT and "exceeds the budget" in out.reason
    (d,) = policy(growth=GrowthConfig(modes=["depth"])).decide(graph([1.0, 1.0, 1.0]))   # no DepthSite: nothing to do
    assert d.action == WAIT


def test_growth_options_enumerate_mode_x_blueprint_within_budget():
    from esper.tamiyo.costs import growth_options

    msg = _with_width(graph([1.0, 1.0, 1.0]))
    node = msg.nodes[0]
    node.deepen.CopyFrom(common_pb2.DepthSite(block_parameters=1056, block_flops=2048, available=True))
    options = growth_options(node, ("branch", "width", "depth"), (), 8, 1e9, 1e9)
    modes = [o.mode for o in options]
    assert modes.count("width") == 1 and modes.count("depth") == 1
    assert modes.count("branch") == len(blueprint_costs_at(node))
    width = next(o for o in options if o.mode == "width")
    assert width.units == 8 and width.decision_fields() == {
        "blueprint": "", "growth_mode": common_pb2.GROWTH_MODE_WIDTH, "growth_units": 8}
    tight = growth_options(node, ("width", "depth"), (), 8, params_left=200, flops_left=1e9)
    assert [(o.mode, o.units) for o in tight] == [("width", 3)]   # 3 x 51 params fit, a block does not


def test_repeated_width_growth_widens_the_least_grown_layer():
    # Three 8-unit narrow layers. Once hidden.0 has grown to 16 (2x), the next width step goes to a
    # layer still at its first width, not back to hidden.0 (heuristic/3 widened the middle layer of
    # the MNIST-1D CNN 8 -> 16 -> 32 while the others stayed narrow). The first widths survive a
    # checkpoint round trip.
    p = policy(growth=GrowthConfig(modes=["width"]))
    msg = _with_width(graph([1.0, 1.0, 1.0], grads=(0.5, 0.1, 0.1)), units=8, input_dim=24, output_dim=24)
    (d,) = p.decide(msg)
    assert d.layer_name == "hidden.0" and "least grown: 1x" in d.reason
    msg.nodes[0].width.units = 16
    restored = policy(growth=GrowthConfig(modes=["width"]))
    restored.load_state_dict(p.state_dict())
    (d,) = restored.decide(msg)
    assert d.layer_name == "hidden.1" and d.growth_mode == common_pb2.GROWTH_MODE_WIDTH
    # Least grown first even over a bottleneck: hidden.2 reads 4 features (never narrow, not
    # saturated) but is still at its first width, while hidden.1 (narrow) has grown.
    msg.nodes[1].width.units = 16
    msg.nodes[2].width.input_dim = 4
    (d,) = restored.decide(msg)
    assert d.layer_name == "hidden.2" and "is a layer (least grown: 1x" in d.reason
    msg.nodes[1].width.units = 8
    msg.nodes[2].width.input_dim = 24
    # A policy without the first widths (a heuristic/3 checkpoint) treats every site as not grown.
    old = policy(growth=GrowthConfig(modes=["width"]))
    old.load_state_dict({"decisions_made": 1})
    (d,) = old.decide(msg)
    assert d.layer_name == "hidden.0"


def test_reported_first_widths_win_over_the_policys_memory():
    # A trainer reports each pair's first width (WidthSite.initial_units): a policy that first sees
    # the run after hidden.0 grew 8 -> 16 (a restarted Tamiyo without its state) still knows it grew.
    msg = _with_width(graph([1.0, 1.0, 1.0], grads=(0.5, 0.1, 0.1)), units=8, input_dim=24, output_dim=24)
    for node in msg.nodes:
        node.width.initial_units = 8
    msg.nodes[0].width.units = 16
    (d,) = policy(growth=GrowthConfig(modes=["width"])).decide(msg)
    assert d.layer_name == "hidden.1" and "least grown: 1x" in d.reason
    # Growth only orders sites where width growth is allowed: branch-only, health decides.
    (d,) = policy(growth=GrowthConfig(modes=["branch"])).decide(msg)
    assert d.layer_name == "hidden.0" and "worst health" in d.reason
