"""Width growth math: function preservation, merge, optimizer state, GradMax alignment, TINY."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from esper.kasmina.growth import (
    WidthPair,
    WidthSeed,
    attached,
    capture_statistics,
    gradmax_init,
    merge_width_seed,
    pair_modules,
    random_init,
    tiny_init,
    widen_pair,
)
from esper.models import MLP, SmallCNN1d, SmallCNN2d
from esper.models.resnet import ResNetCifar


def _data(shape, n=64, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def _seed(model, pair, units, init, x, y, seed=0):
    mods = pair_modules(model, pair)
    s = WidthSeed(pair, mods, units)
    g = torch.Generator().manual_seed(seed)
    if init == "random":
        random_init(s, mods, g)
    elif init == "gradmax":
        gradmax_init(s, mods, capture_statistics(model, pair, [(x, y)], F.cross_entropy), g)
    return s


HOSTS = {
    "mlp": (lambda: MLP(20, hidden=6, num_classes=10, depth=2), (20,)),
    "cnn1d": (lambda: SmallCNN1d(1, 10, channels=(4, 6, 6)), (1, 16)),
    "cnn2d": (lambda: SmallCNN2d(3, 10, channels=(4, 6, 6)), (3, 8, 8)),
    "resnet": (lambda: ResNetCifar((1, 1, 1, 1), num_classes=10, width=4), (3, 8, 8)),
}


def _all_pairs():
    for host, (build, _) in HOSTS.items():
        # ResNet: a stride-1 block and a downsampling one are enough (the rest are the same code).
        for i in range(len(build().width_pairs()) if host != "resnet" else 2):
            yield host, i


@pytest.mark.parametrize("host,index", list(_all_pairs()))
@pytest.mark.parametrize("init", ["gradmax", "random"])
def test_insertion_preserves_function_and_merge_matches(host, index, init):
    torch.manual_seed(0)
    build, shape = HOSTS[host]
    model = build().double().train()
    model.float()
    pair = model.width_pairs()[index]
    x, y = _data(shape)
    model.eval()  # BatchNorm uses running statistics: outputs are per-sample comparable
    before = model(x).detach()
    seed = _seed(model, pair, 3, init, x, y)
    with torch.no_grad(), attached(model, pair, seed):
        inserted = model(x)
    assert (inserted - before).abs().max() <= 1e-6
    # Train the seed a little so the merge test merges non-trivial units.
    with torch.no_grad():
        for p in seed.parameters():
            p.add_(0.1 * torch.randn_like(p))
    with torch.no_grad(), attached(model, pair, seed):
        seeded = model(x)
    assert (seeded - before).abs().max() > 1e-4
    units = pair_modules(model, pair).units
    merge_width_seed(model, pair, seed)
    assert pair_modules(model, pair).units == units + 3
    with torch.no_grad():
        merged = model(x)
    assert (merged - seeded).abs().max() <= 1e-5


def test_merged_mlp_is_a_static_model_of_that_width():
    from esper.tolaria.hosts import forward_flops_per_sample

    model = MLP(20, hidden=4, num_classes=10, depth=1)
    x, y = _data((20,))
    pair = model.width_pairs()[0]
    widen_pair(model, pair, _seed(model, pair, 4, "gradmax", x, y))
    static = MLP(20, hidden=8, num_classes=10, depth=1)
    assert [(n, p.shape) for n, p in model.named_parameters()] == [(n, p.shape) for n, p in static.named_parameters()]
    assert [type(m) for m in model.modules()] == [type(m) for m in static.modules()]
    cpu = torch.device("cpu")
    assert forward_flops_per_sample(model, (20,), cpu) == forward_flops_per_sample(static, (20,), cpu)


def _step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("optim", ["sgd", "adam"])
@pytest.mark.parametrize("fill", ["zero", "stats"])
def test_optimizer_state_of_old_weights_is_unchanged(optim, fill):
    torch.manual_seed(0)
    model = MLP(20, hidden=5, num_classes=10, depth=1)
    x, y = _data((20,))
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if optim == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-2))
    for _ in range(3):
        _step(model, opt, x, y)
    pair = model.width_pairs()[0]
    keys = ("momentum_buffer",) if optim == "sgd" else ("exp_avg", "exp_avg_sq")
    old = {name: {k: opt.state[p][k].clone() for k in keys} for name, p in model.named_parameters()}
    widen_pair(model, pair, _seed(model, pair, 3, "gradmax", x, y), optimizer=opt, fill=fill)
    params = dict(model.named_parameters())
    assert sum(len(g["params"]) for g in opt.param_groups) == len(params)
    for name, p in params.items():
        assert p in opt.state, name
        for k in keys:
            new = opt.state[p][k]
            assert new.shape == p.shape
            o = old[name][k]
            region = new[: o.shape[0], : o.shape[1]] if new.dim() == 2 else new[: o.shape[0]]
            assert torch.equal(region, o), (name, k)
            if new.shape != o.shape:
                extra = new[o.shape[0]:] if new.shape[0] != o.shape[0] else new[:, o.shape[1]:]
                if fill == "stats" and k == "exp_avg_sq":
                    assert torch.allclose(extra, torch.full_like(extra, float(o.mean())))
                else:
                    assert torch.count_nonzero(extra) == 0, (name, k)
    _step(model, opt, x, y)  # the optimizer still works on the grown parameters


def test_gradmax_fan_out_aligns_with_top_singular_vectors_of_the_gradient():
    torch.manual_seed(0)
    model = MLP(30, hidden=4, num_classes=12, depth=1)
    x, y = _data((30,), n=256, classes=12)
    pair = model.width_pairs()[0]
    stats = capture_statistics(model, pair, [(x, y)], F.cross_entropy)
    # The gradient of a zero map between the two layers: sum_n delta_n x_n^T (out x in).
    g = stats.delta.T @ stats.x
    u, sv, _ = torch.linalg.svd(g.double())
    k = 3
    mods = pair_modules(model, pair)

    def fan_in_grad_norm(seed):
        seed.zero_grad()
        with attached(model, pair, seed):
            F.cross_entropy(model(x), y, reduction="sum").backward()
        model.zero_grad()
        return float(seed.fan_in.weight.grad.norm())

    grad_seed = WidthSeed(pair, mods, k)
    gradmax_init(grad_seed, mods, stats, torch.Generator().manual_seed(1))
    fan_out = grad_seed.fan_out.weight.detach().double()        # (out, k)
    cols = fan_out / fan_out.norm(dim=0, keepdim=True)
    overlap = (u[:, :k].T @ cols).square().sum(0)               # energy of each column in the top-k span
    assert overlap.min() > 0.99
    assert torch.count_nonzero(grad_seed.fan_in.weight) == 0
    # Against fan-outs of the same norm in random directions: GradMax's fan-in gradient is larger.
    rand_seed = WidthSeed(pair, mods, k)
    with torch.no_grad():
        rand_seed.fan_in.weight.zero_()
        r = torch.randn(fan_out.shape, generator=torch.Generator().manual_seed(2)).double()
        rand_seed.fan_out.weight.copy_(r / r.norm(dim=0, keepdim=True) * fan_out.norm(dim=0, keepdim=True))
    gm, rnd = fan_in_grad_norm(grad_seed), fan_in_grad_norm(rand_seed)
    assert gm > 1.5 * rnd
    # And it reaches the optimum: sqrt(sum of the top-k squared singular values) times the column norm.
    expected = float(sv[:k].square().sum().sqrt()) * float(fan_out.norm(dim=0).mean())
    assert gm == pytest.approx(expected, rel=1e-3)


def test_tiny_lowers_the_loss_with_its_line_searched_scale():
    torch.manual_seed(0)
    model = MLP(30, hidden=3, num_classes=10, depth=1)
    x, y = _data((30,), n=256)
    pair = model.width_pairs()[0]
    mods = pair_modules(model, pair)
    stats = capture_statistics(model, pair, [(x, y)], F.cross_entropy)
    seed = WidthSeed(pair, mods, 4)

    def loss_of(s):
        with torch.no_grad(), attached(model, pair, s):
            return float(F.cross_entropy(model(x), y))

    with torch.no_grad():
        base = float(F.cross_entropy(model(x), y))
    gamma = tiny_init(seed, mods, stats, loss_of, torch.Generator().manual_seed(0))
    assert 0 < gamma <= 1
    assert loss_of(seed) < base - 1e-3
    # The scale matters: the largest grid value is not automatically the choice.
    assert torch.count_nonzero(seed.fan_in.weight) > 0 and torch.count_nonzero(seed.fan_out.weight) > 0


def test_bad_pair_names_what_is_wrong():
    model = MLP(20, hidden=4, num_classes=10, depth=2)
    with pytest.raises(KeyError, match="nope"):
        pair_modules(model, WidthPair("hidden.0", "nope"))
    with pytest.raises(ValueError, match="consumer reads"):
        pair_modules(model, WidthPair("hidden.0", "hidden.0"))
    with pytest.raises(ValueError, match="activation"):
        WidthPair("hidden.0", "hidden.1", activation="gelu")


def test_gradmax_dual_keeps_units_merged_into_a_plain_relu_host_alive():
    # Merged at once, new units meet torch.relu (derivative 0 at 0): with a zero fan-in they would
    # never train. The dual GradMax (fan-out zero, fan-in from the top singular vectors) is
    # function-preserving and its units learn from the first step.
    torch.manual_seed(0)
    model = MLP(30, hidden=4, num_classes=10, depth=1)
    x, y = _data((30,), n=128)
    before = model(x).detach()
    pair = model.width_pairs()[0]
    mods = pair_modules(model, pair)
    seed = WidthSeed(pair, mods, 3)
    gradmax_init(seed, mods, capture_statistics(model, pair, [(x, y)], F.cross_entropy),
                 torch.Generator().manual_seed(0), zero="fan_out")
    assert torch.count_nonzero(seed.fan_out.weight) == 0 and torch.count_nonzero(seed.fan_in.weight) > 0
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    widen_pair(model, pair, seed, optimizer=opt)
    assert (model(x) - before).abs().max() <= 1e-6
    for _ in range(3):
        _step(model, opt, x, y)
    assert torch.count_nonzero(model.head.weight[:, 4:]) > 0      # the new units' fan-out trains


def test_gradmax_dual_signs_each_unit_so_that_it_is_live_on_the_data():
    # The second pair of an MLP reads ReLU outputs (all >= 0): a fan-in row and its negation are
    # the same singular vector, but one of them leaves its unit at 0 for most samples. Each unit
    # must carry the sign with the larger real (ReLU) fan-out gradient, the gradient it trains on.
    from esper.kasmina.growth.init import _relu_hidden

    torch.manual_seed(0)
    model = MLP(40, hidden=16, num_classes=10, depth=2)
    x, y = _data((40,), n=256)
    pair = model.width_pairs()[1]
    mods = pair_modules(model, pair)
    stats = capture_statistics(model, pair, [(x, y)], F.cross_entropy)
    seed = WidthSeed(pair, mods, 8)
    gradmax_init(seed, mods, stats, torch.Generator().manual_seed(3), zero="fan_out")

    def fan_out_grad_norms(rows):
        with torch.no_grad():
            seed.fan_in.weight.copy_(rows)
        b = torch.zeros_like(seed.fan_out.weight, requires_grad=True)
        value = (F.linear(_relu_hidden(seed, stats.x), b) * stats.delta).sum()
        (grad,) = torch.autograd.grad(value, b)
        return grad.norm(dim=0)

    chosen = seed.fan_in.weight.detach().clone()
    kept, flipped = fan_out_grad_norms(chosen), fan_out_grad_norms(-chosen)
    assert bool((kept >= flipped).all()), (kept, flipped)
    assert bool((kept > flipped).any())  # the choice mattered for some unit


@pytest.mark.parametrize("init", ["gradmax", "tiny"])
def test_units_beyond_the_operators_rank_are_not_born_dead(init):
    # The first conv of a 1-channel 1D CNN reads 1 x 3 patches: its operator has rank <= 3, so only
    # 3 singular vectors exist for 8 new units. Every unit must still get a distinct non-zero
    # fan-in (the rest random at the producer's scale), the insertion must stay function-preserving,
    # and every new unit's fan-out must train (a unit zero both ways never gets a gradient).
    torch.manual_seed(0)
    model = SmallCNN1d(1, 10, channels=(4, 6, 6))
    x, y = _data((1, 16), n=128)
    model.train()
    before = model(x).detach()
    pair = model.width_pairs()[0]
    mods = pair_modules(model, pair)
    stats = capture_statistics(model, pair, [(x, y)], F.cross_entropy)
    seed = WidthSeed(pair, mods, 8)
    g = torch.Generator().manual_seed(0)
    if init == "gradmax":
        s = gradmax_init(seed, mods, stats, g, zero="fan_out")
        assert s.shape[0] <= 3                            # the rank limit this test is about
    else:
        def loss_of(sd):
            with torch.no_grad(), attached(model, pair, sd):
                return float(F.cross_entropy(model(x), y))
        tiny_init(seed, mods, stats, loss_of, g)
        seed.fan_out.weight.data.zero_()                  # merged at once: fan-out zero
    rows = seed.fan_in.weight.detach().reshape(8, -1)
    assert bool((rows.norm(dim=1) > 0).all()), rows.norm(dim=1)
    assert torch.linalg.matrix_rank(rows) == 3            # as many directions as the space has
    assert torch.unique(rows, dim=0).shape[0] == 8        # no two units the same
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    widen_pair(model, pair, seed, optimizer=opt)
    assert (model(x) - before).abs().max() <= 1e-6
    for _ in range(3):
        _step(model, opt, x, y)
    new_fan_out = model.convs[1].weight[:, 4:]
    assert bool((new_fan_out.abs().sum(dim=(0, 2)) > 0).all())   # every new unit trains
