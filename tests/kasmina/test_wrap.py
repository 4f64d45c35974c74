"""wrap / seed_sites on the reference hosts: outputs unchanged, seeds grow and train in each."""

import copy

import pytest
import torch
from torch import nn

import esper.kasmina as K
from esper.lifecycle import SeedLifecycleState as S
from esper.models import MLP, SmallCNN1d, SmallCNN2d, resnet18_cifar
from esper.models.resnet import BasicBlock

CASES = {
    "mlp": (lambda: MLP(20, 16, 5, depth=3), ["hidden.0", "hidden.2"], (6, 20), "residual_mlp"),
    "cnn1d": (lambda: SmallCNN1d(2, 5, channels=(8, 16)), ["convs.0", "convs.1"], (6, 2, 24), "conv1d_k3"),
    "cnn2d": (lambda: SmallCNN2d(3, 5, channels=(8, 16)), ["convs.0", "convs.1"], (6, 3, 12, 12), "conv3x3"),
    "resnet18": (lambda: resnet18_cifar(num_classes=5, width=8), ["layer1.0", "layer3.1", "layer4.1"],
                 (4, 3, 32, 32), "bottleneck"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_wrap_keeps_outputs_and_grown_seeds_train(case):
    make, names, shape, bid = CASES[case]
    torch.manual_seed(0)
    plain = make().double()
    model = copy.deepcopy(plain)
    returned = K.wrap(model, names, seeds_per_layer=2)
    assert returned is model
    sites = K.seed_sites(model)
    assert [n for n, _ in sites] == names
    x = torch.randn(shape, dtype=torch.float64)
    assert torch.equal(model(x), plain(x))
    for _, layer in sites:
        layer.germinate(0, bid)
        layer.transition(0, S.GRAFTING, "test")
        layer.advance(1.0)  # alpha 1 at once: the seed is fully blended in
    assert torch.allclose(model(x), plain(x), atol=1e-12, rtol=0)  # zero-initialised seeds
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = [p.detach().clone() for _, layer in sites for p in layer.seed_parameters(0)]
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    after = [p for _, layer in sites for p in layer.seed_parameters(0)]
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
    model.eval(), plain.eval()
    assert not torch.allclose(model(x), plain(x))  # the seeds now change the function


def test_resnet_basic_block_channels_are_inferred():
    model = resnet18_cifar(num_classes=10, width=8)
    K.wrap(model, model.seed_site_names(), seeds_per_layer=4)
    layer = dict(K.seed_sites(model))["layer3.0"]
    assert isinstance(layer.host, BasicBlock)
    assert layer.channels == 32 and layer.chunk_size == 8 and layer.spatial_dims == 2
    assert len(K.seed_sites(model)) == 8


def test_generic_block_takes_channels_and_spatial_dims():
    block = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
    model = nn.Sequential(block, nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match="pass channels=C"):
        K.wrap(copy.deepcopy(model), ["0"])
    K.wrap(model, ["0"], seeds_per_layer=3, channels={"0": 6})
    layer = model[0]
    assert layer.channels == 6 and layer.spatial_dims == 2 and layer.chunk_size == 2
    layer.germinate(2, "conv1x1")
    assert model(torch.randn(2, 3, 4, 4)).shape == (2, 2)
    seq = nn.Sequential(nn.Identity())
    K.wrap(seq, ["0"], channels=4, spatial_dims=1)
    assert seq[0].input_kind == 2  # SEQUENCE


def test_wrap_errors_are_specific():
    model = MLP(4, 8, 2, depth=2)
    with pytest.raises(KeyError, match="no submodule 'hidden.7'.*hidden.0"):
        K.wrap(model, ["hidden.7"])
    with pytest.raises(ValueError, match="at least one"):
        K.wrap(model, [])
    with pytest.raises(ValueError, match="duplicates"):
        K.wrap(model, ["hidden.0", "hidden.0"])
    K.wrap(model, ["hidden.0"])
    with pytest.raises(ValueError, match="already wrapped"):
        K.wrap(model, ["hidden.0"])
    with pytest.raises(ValueError, match="divide"):
        K.wrap(model, ["hidden.1"], seeds_per_layer=3)


def test_telemetry_probe_covers_dormant_sites_only_inside_the_block():
    model = K.wrap(MLP(4, 8, 2, depth=2), ["hidden.0", "hidden.1"])
    x = torch.randn(5, 4)
    model(x).sum().backward()
    assert all(r.telemetry["samples"] == 0 for _, layer in K.seed_sites(model) for r in layer.seed_table())
    with K.telemetry_probe(model):
        model(x).sum().backward()
    for _, layer in K.seed_sites(model):
        row = layer.seed_table()[0]
        assert row.state == S.DORMANT and row.telemetry["samples"] == 40 and row.telemetry["gradient_norm"] > 0
        assert layer.num_active == 0 and layer._live == 0


def test_model_level_table_disable_and_precision_changes_keep_table_dtypes():
    torch.manual_seed(5)
    model = K.wrap(MLP(4, 8, 2, depth=2), ["hidden.0", "hidden.1"], seeds_per_layer=2)
    model.hidden[1].germinate(1, "residual_mlp")
    model.hidden[1].transition(1, S.GRAFTING, "test")
    model.hidden[1].advance(1.0)
    with torch.no_grad():
        for p in model.hidden[1].seed_parameters(1):
            p.normal_()
    rows = K.seed_table(model)
    assert [(r.layer, r.seed, r.state) for r in rows] == [
        ("hidden.0", 0, S.DORMANT), ("hidden.0", 1, S.DORMANT), ("hidden.1", 0, S.DORMANT),
        ("hidden.1", 1, S.GRAFTING),
    ]
    model.double()
    table = model.hidden[1].table
    assert table.alpha.dtype == torch.float32 and table.telemetry.dtype == torch.float64
    assert table.state.dtype == torch.int64
    x = torch.randn(3, 4, dtype=torch.float64)
    with_seed = model(x)
    with K.all_seeds_disabled(model):
        without = model(x)
        assert float(table.alpha[1]) == 0.0
    assert float(table.alpha[1]) == 1.0
    assert not torch.allclose(with_seed, without)
    plain_like = copy.deepcopy(model)
    plain_like.hidden[1].rollback(1, "compare with the host alone")
    assert torch.equal(without, plain_like(x))


def test_wrapped_model_with_active_seeds_exports_and_runs_in_bfloat16():
    torch.manual_seed(6)
    model = K.wrap(SmallCNN2d(3, 5, channels=(8, 16)), ["convs.0", "convs.1"], seeds_per_layer=2)
    model.convs[1].germinate(0, "conv3x3")
    model.convs[1].transition(0, S.GRAFTING, "test")
    model.convs[1].advance(0.5)
    with torch.no_grad():
        for p in model.convs[1].seed_parameters(0):
            p.normal_()
    model.convs[0].germinate(1, "depthwise_separable")
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("b", min=1, max=64)},))
    x5 = torch.randn(5, 3, 8, 8)
    assert torch.allclose(program.module()(x5), model(x5))

    half = K.wrap(nn.Sequential(nn.Linear(4, 8)).bfloat16(), ["0"], seeds_per_layer=2)
    half[0].germinate(0, "residual_mlp")
    assert half[0].seeds["0"][0].weight.dtype == torch.bfloat16
    half[0].transition(0, S.GRAFTING, "test")
    half[0].advance(1.0)
    out = half(torch.randn(3, 4, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert half[0].seed_table()[0].telemetry["samples"] == 12
