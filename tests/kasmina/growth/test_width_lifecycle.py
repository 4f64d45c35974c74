"""Width seeds in the Kasmina lifecycle: insertion, cull, merge at fossilization, checkpoints."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from esper.kasmina import seed_sites, wrap
from esper.kasmina.growth import WidthGrowth
from esper.lifecycle import SeedLifecycleState as S
from esper.models import MLP, SmallCNN1d


def _mlp():
    torch.manual_seed(0)
    model = wrap(MLP(16, hidden=4, num_classes=6, depth=2), ["hidden.0", "hidden.1"])
    return model, WidthGrowth(model, model.width_pairs(), seed_sites(model), (16,))


def _batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 16, generator=g), torch.randint(0, 6, (32,), generator=g)) for _ in range(n)]


def _germinate(model, growth, site="hidden.0", units=3, init="gradmax", opt=None, fill="zero"):
    data = _batches()
    growth.germinate(site, 0, units, init, lambda: data, F.cross_entropy, optimizer=opt, fill=fill,
                     generator=torch.Generator().manual_seed(0))
    return dict(seed_sites(model))[site]


def _walk_to(layer, index, target):
    path = [S.GRAFTING, S.STABILIZATION, S.EVALUATING, S.FINE_TUNING, S.FOSSILIZED]
    for state in path[: path.index(target) + 1]:
        layer.transition(index, state, "test")


def test_insertion_is_exact_and_the_seed_learns_in_training():
    model, growth = _mlp()
    x, y = _batches(1, seed=3)[0]
    before = model(x).detach()
    layer = _germinate(model, growth, init="tiny")
    assert layer.state_of(0) == S.TRAINING
    seed = layer.seeds["0"]
    assert (model(x) - before).abs().max() <= 1e-6      # TRAINING: the consumer output is the host's
    F.cross_entropy(model(x), y).backward()
    assert seed.fan_in.weight.grad.abs().sum() > 0 and seed.fan_out.weight.grad.abs().sum() > 0
    layer.transition(0, S.GRAFTING, "test")
    assert (model(x) - before).abs().max() <= 1e-6      # alpha = 0 at the start of grafting


def test_cull_drops_the_units_and_their_hooks():
    model, growth = _mlp()
    x, _ = _batches(1, seed=3)[0]
    before = model(x).detach()
    layer = _germinate(model, growth, init="random")
    _walk_to(layer, 0, S.FINE_TUNING)
    with torch.no_grad():
        layer.seeds["0"].fan_out.weight.fill_(0.5)
    assert (model(x) - before).abs().max() > 1e-3
    layer.cull(0, "test")
    assert "0" not in layer.seeds
    assert torch.equal(model(x), before)
    assert not model.hidden[0].host._forward_pre_hooks and not model.hidden[1].host._forward_hooks


def test_merge_at_fossilization_keeps_outputs_and_optimizer_state():
    model, growth = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = _batches()
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    layer = _germinate(model, growth, opt=opt, fill="stats")
    seed = layer.seeds["0"]
    host_w = model.hidden[0].host.weight
    # fill="stats": the seed's second moments start at the mean of the host weight's.
    assert torch.allclose(opt.state[seed.fan_in.weight]["exp_avg_sq"],
                          torch.full_like(seed.fan_in.weight, float(opt.state[host_w]["exp_avg_sq"].mean())))
    opt.add_param_group({"params": list(seed.parameters())})
    _walk_to(layer, 0, S.FINE_TUNING)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    layer.transition(0, S.FOSSILIZED, "test")
    x, _ = _batches(1, seed=5)[0]
    model.eval()
    before = model(x).detach()
    old_state = {k: v.clone() for k, v in opt.state[host_w].items()}
    seed_state = {k: v.clone() for k, v in opt.state[seed.fan_in.weight].items()}
    assert growth.merge_fossilized(opt) == [("hidden.0", 0, 3)]
    assert layer.state_of(0) == S.DORMANT and "0" not in layer.seeds
    assert layer.channels == 7 and model.hidden[0].host.out_features == 7 and model.hidden[1].host.in_features == 7
    assert (model(x) - before).abs().max() <= 1e-6
    new_w = model.hidden[0].host.weight
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[new_w][key][:4], old_state[key])
        assert torch.equal(opt.state[new_w][key][4:], seed_state[key])
    assert growth.merged == [("hidden.0>hidden.1", 3)]
    assert growth.blocked("hidden.0") == ""  # the slot is free for the next growth


def test_checkpoint_of_in_flight_and_merged_width_seeds_loads_into_a_fresh_model():
    model, growth = _mlp()
    layer = _germinate(model, growth)
    _walk_to(layer, 0, S.FOSSILIZED)
    growth.merge_fossilized()
    layer = _germinate(model, growth, units=2)
    _walk_to(layer, 0, S.FINE_TUNING)
    with torch.no_grad():
        layer.seeds["0"].fan_in.weight.normal_()
    state = model.state_dict()
    fresh, fresh_growth = _mlp()
    fresh_growth.restore(growth.merged)
    fresh.load_state_dict(state)
    x, _ = _batches(1, seed=7)[0]
    assert torch.equal(fresh(x), model(x))
    assert dict(seed_sites(fresh))["hidden.0"].state_of(0) == S.FINE_TUNING


def test_conv_width_seed_inserts_exactly_in_a_wrapped_cnn():
    torch.manual_seed(0)
    model = wrap(SmallCNN1d(1, 5, channels=(4, 4, 4)), ["convs.0", "convs.1", "convs.2"])
    growth = WidthGrowth(model, model.width_pairs(), seed_sites(model), (1, 16))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 1, 16, generator=g), torch.randint(0, 5, (16,), generator=g))]
    x = data[0][0]
    model.eval()
    before = model(x).detach()
    growth.germinate("convs.1", 0, 2, "gradmax", lambda: data, F.cross_entropy)
    assert (model(x) - before).abs().max() <= 1e-6
    layer = dict(seed_sites(model))["convs.1"]
    _walk_to(layer, 0, S.FOSSILIZED)
    with torch.no_grad():
        layer.seeds["0"].fan_in.weight.normal_()
    grown = model(x).detach()
    growth.merge_fossilized()
    assert model.convs[1].host.out_channels == 6 and model.norms[1].num_features == 6
    assert (model(x) - grown).abs().max() <= 1e-5


def test_merge_waits_while_a_residual_seed_runs_at_the_site():
    torch.manual_seed(0)
    model = wrap(MLP(16, hidden=4, num_classes=6, depth=1), ["hidden.0"], seeds_per_layer=2)
    growth = WidthGrowth(model, model.width_pairs(), seed_sites(model), (16,))
    layer = dict(seed_sites(model))["hidden.0"]
    data = _batches()
    growth.germinate("hidden.0", 0, 2, "gradmax", lambda: data, F.cross_entropy)
    assert growth.blocked("hidden.0")  # no second width seed at a site with one in flight
    layer.germinate(1, "residual_mlp")
    _walk_to(layer, 0, S.FOSSILIZED)
    x, _ = data[0]
    grown = model(x).detach()
    assert growth.merge_fossilized() == []
    assert layer.state_of(0) == S.FOSSILIZED and torch.equal(model(x), grown)
    layer.cull(1, "test")
    assert growth.merge_fossilized() == [("hidden.0", 0, 2)]
    assert layer.channels == 6 and (model(x) - grown).abs().max() <= 1e-6


def test_first_width_survives_merges_and_restore():
    # What the trainer reports as WidthSite.initial_units (heuristic/4 widens the least-grown layer
    # relative to it): the units before any merge, also after a checkpoint restore.
    model, growth = _mlp()
    assert growth.first_width("hidden.0") == growth.width_at("hidden.0") == 4
    layer = _germinate(model, growth)
    _walk_to(layer, 0, S.FOSSILIZED)
    growth.merge_fossilized()
    assert growth.width_at("hidden.0") == 7 and growth.first_width("hidden.0") == 4
    assert growth.first_width("hidden.1") == growth.width_at("hidden.1") == 4
    fresh, fresh_growth = _mlp()
    fresh_growth.restore(growth.merged)
    assert fresh_growth.width_at("hidden.0") == 7 and fresh_growth.first_width("hidden.0") == 4
    assert growth.first_width("no-such-site") == 0
