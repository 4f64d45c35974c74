"""Depth seeds in the Kasmina lifecycle: exact insertion, merge into the DepthStack, optimizer state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from esper.kasmina import seed_sites, wrap
from esper.kasmina.growth.depth_growth import DepthGrowth
from esper.lifecycle import SeedLifecycleState as S
from esper.models import MLP
from esper.models.resnet import ResNetCifar

PATH = [S.GRAFTING, S.STABILIZATION, S.EVALUATING, S.FINE_TUNING, S.FOSSILIZED]


def _train(model, opt, x, y, steps=3):
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_mlp_depth_seed_is_exact_trains_and_merges_with_its_state():
    torch.manual_seed(0)
    model = wrap(MLP(12, hidden=6, num_classes=4, depth=2), ["hidden.0", "hidden.1"])
    growth = DepthGrowth(model, model.depth_sites(), seed_sites(model))
    x, y = torch.randn(32, 12), torch.randint(0, 4, (32,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, opt, x, y)
    before = model(x).detach()
    growth.germinate("hidden.0", 0)
    layer = dict(seed_sites(model))["hidden.0"]
    seed = layer.seeds["0"]
    assert layer.state_of(0) == S.TRAINING and (model(x) - before).abs().max() <= 1e-6
    opt.add_param_group({"params": list(seed.parameters()), "name": "seed"})
    for state in PATH[:-1]:
        layer.transition(0, state, "test")
    _train(model, opt, x, y)
    assert not torch.equal(seed.block.weight, torch.eye(6))   # it trained as a seed
    layer.transition(0, S.FOSSILIZED, "test")
    grown = model(x).detach()
    state = {k: v.clone() for k, v in opt.state[seed.block.weight].items()}
    assert growth.merge_fossilized(opt) == [("hidden.0", 0)]
    assert layer.state_of(0) == S.DORMANT and len(model.deepen[0].blocks) == 1
    assert (model(x) - grown).abs().max() <= 1e-6
    merged = model.deepen[0].blocks[0].weight
    assert merged is seed.block.weight and torch.equal(opt.state[merged]["exp_avg_sq"], state["exp_avg_sq"])
    # The host group now lists the block where a freshly built model has it (model order).
    host_ids = [id(p) for p in opt.param_groups[0]["params"]]
    assert host_ids == [id(p) for p in model.parameters()]
    assert opt.param_groups[1]["params"] == []
    # A checkpoint of the deepened model loads into a fresh one once the stacks are rebuilt.
    fresh = wrap(MLP(12, hidden=6, num_classes=4, depth=2), ["hidden.0", "hidden.1"])
    DepthGrowth(fresh, fresh.depth_sites(), seed_sites(fresh)).restore(growth.merged)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("mode", ["identity", "copy"])
def test_resnet_depth_seed_is_exact_and_merges(mode):
    torch.manual_seed(0)
    model = wrap(ResNetCifar((1, 1, 1, 1), num_classes=5, width=4), ["layer1.0", "layer2.0"])
    growth = DepthGrowth(model, model.depth_sites(), seed_sites(model))
    x = torch.randn(4, 3, 8, 8)
    model.eval()
    before = model(x).detach()
    growth.germinate("layer1.0", 0, mode)
    assert (model(x) - before).abs().max() <= 1e-6
    layer = dict(seed_sites(model))["layer1.0"]
    for state in PATH:
        layer.transition(0, state, "test")
    with torch.no_grad():
        layer.seeds["0"].block.bn2.weight.fill_(0.3)
    grown = model(x).detach()
    assert (grown - before).abs().max() > 1e-4
    growth.merge_fossilized()
    assert len(model.deepen["layer1_0"].blocks) == 1
    assert (model(x) - grown).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="identity shortcut"):
        growth.germinate("layer2.0", 0, "copy")   # a downsampling neighbour cannot be copied
