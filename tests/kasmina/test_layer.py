"""KasminaLayer: dormant fast path, function preservation, TRAINING/GRAFTING semantics, NaN guard,
telemetry, counterfactual context, optimizer hand-over and checkpoints."""

import copy
import io

import pytest
import torch
from torch import nn

import esper.kasmina as K
from esper.kasmina import ops
from esper.kasmina.blueprints import CATALOG, validate_blueprint
from esper.kasmina.blueprints.spec import FEATURES, IMAGE, SEQUENCE, BlueprintError
from esper.lifecycle import SeedLifecycleState as S

HOSTS = {
    FEATURES: (lambda: nn.Linear(12, 16), (5, 12)),
    SEQUENCE: (lambda: nn.Conv1d(3, 16, 3, padding=1), (5, 3, 9)),
    IMAGE: (lambda: nn.Conv2d(3, 16, 3, padding=1), (5, 3, 6, 6)),
}


def _fits(spec, kind, chunk):
    try:
        validate_blueprint(spec, chunk, kind)
        return True
    except BlueprintError:
        return False


def _cases():
    return [
        pytest.param(bid, kind, id=f"{bid}-{kind}")
        for bid, spec in CATALOG.items()
        for kind in HOSTS
        if _fits(spec, kind, 8)
    ]


def _host_grads(module):
    return [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize(("bid", "kind"), _cases())
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("state", [S.TRAINING, S.GRAFTING])
def test_germination_preserves_function_and_host_gradients(bid, kind, dtype, tol, state):
    torch.manual_seed(0)
    make, shape = HOSTS[kind]
    host = make().to(dtype)
    plain = copy.deepcopy(host)
    layer = K.KasminaLayer(host, num_seeds=2, name="site")
    x = torch.randn(shape, dtype=dtype)
    target = torch.randn_like(plain(x))

    ref = plain(x)
    (ref * target).sum().backward()

    layer.germinate(1, bid)
    if state == S.GRAFTING:
        layer.transition(1, S.GRAFTING, "test")
        layer.advance(0.5)  # alpha 0.5: the zero-initialised seed still adds nothing
    out = layer(x)
    assert torch.allclose(out, ref, atol=tol, rtol=0)
    (out * target).sum().backward()
    for g_wrapped, g_plain in zip(_host_grads(layer.host), _host_grads(plain), strict=True):
        assert torch.allclose(g_wrapped, g_plain, atol=tol, rtol=0)
    seed_grads = [p.grad for p in layer.seed_parameters(1)]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in seed_grads)


def test_dormant_fast_path_returns_host_output_and_calls_no_op(monkeypatch):
    host = nn.Linear(4, 8)
    layer = K.KasminaLayer(host, num_seeds=2, name="fc")
    seen = []
    host.register_forward_hook(lambda m, i, o: seen.append(o))
    for name in ("seed_blend", "telemetry_accumulate_", "grad_telemetry_accumulate_", "lifecycle_advance_"):
        monkeypatch.setattr(ops, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError("op called")))
    x = torch.randn(3, 4, requires_grad=True)
    out = layer(x)
    assert out is seen[0]
    out.sum().backward()
    layer.advance(0.1)  # all dormant: no lifecycle op either
    layer.germinate(0, "residual_mlp", await_kernel=True)  # GERMINATED has no seed work yet
    assert layer(x) is seen[-1]


def test_training_seed_changes_nothing_in_the_host_yet_learns():
    torch.manual_seed(1)
    plain = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    model = copy.deepcopy(plain)
    K.wrap(model, ["0"], seeds_per_layer=2)
    model[0].germinate(0, "residual_mlp")
    model[0].germinate(1, "lora_adapter")
    seed_before = [p.detach().clone() for p in model[0].seed_parameters()]
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(5):
        x = torch.randn(16, 6, dtype=torch.float64)
        y = torch.randint(0, 3, (16,))
        for m, o in ((plain, opt_plain), (model, opt)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
        assert torch.equal(model(x), plain(x)), f"host output moved at step {step}"
    for p_plain, p_host in zip(plain.parameters(), model[0].host.parameters(), strict=False):
        assert torch.equal(p_plain, p_host)
    seed_after = list(model[0].seed_parameters())
    assert any(not torch.equal(b, a) for b, a in zip(seed_before, seed_after, strict=True))
    # ... and the seed now produces a non-zero delta that TRAINING still keeps out of the output.
    x = torch.randn(4, 6, dtype=torch.float64)
    h = model[0].host(x)
    assert float(model[0].seeds["0"](h[:, :4]).detach().abs().max()) > 0


def _trained_seed_layer(dtype=torch.float64):
    torch.manual_seed(2)
    layer = K.KasminaLayer(nn.Linear(5, 8).to(dtype), num_seeds=2, name="fc")
    layer.germinate(1, "residual_mlp")
    with torch.no_grad():
        for p in layer.seed_parameters(1):
            p.normal_()
    return layer


def test_grafting_output_moves_with_alpha():
    layer = _trained_seed_layer()
    x = torch.randn(7, 5, dtype=torch.float64)
    h = layer.host(x)
    s = layer.seeds["1"](h[:, 4:])
    assert torch.equal(layer(x), h)  # TRAINING: exactly h
    layer.transition(1, S.GRAFTING, "test")
    assert torch.equal(layer(x), h)  # alpha 0
    for k in range(1, 5):
        layer.advance(0.25)
        alpha = float(layer.table.alpha[1])
        assert alpha == pytest.approx(0.25 * k)
        out = layer(x)
        assert torch.equal(out[:, :4], h[:, :4])
        assert torch.allclose(out[:, 4:], h[:, 4:] + alpha * s, atol=1e-12)
    with layer.seed_disabled(1):
        assert torch.equal(layer(x), h)
    assert float(layer.table.alpha[1]) == 1.0
    assert not torch.equal(layer(x), h)


def test_frozen_states_do_not_train_the_seed():
    layer = _trained_seed_layer()
    layer.transition(1, S.GRAFTING, "test")
    layer.transition(1, S.STABILIZATION, "test")
    x = torch.randn(4, 5, dtype=torch.float64)
    layer(x).sum().backward()
    assert all(p.grad is None for p in layer.seed_parameters(1))
    assert all(p.grad is not None for p in layer.host.parameters())
    layer.transition(1, S.EVALUATING, "test")
    layer.transition(1, S.FINE_TUNING, "test")
    layer(x).sum().backward()
    assert all(p.grad is not None for p in layer.seed_parameters(1))


class _Poison(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        out = x * self.scale
        return torch.cat([out[:, :1] * 0 + self.value, out[:, 1:]], dim=1)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_seed_never_reaches_the_host_output(value):
    layer = K.KasminaLayer(nn.Linear(3, 4), num_seeds=2, name="fc")
    layer.germinate(0, "residual_mlp", module=_Poison(value))
    for to in (S.GRAFTING, S.STABILIZATION, S.EVALUATING, S.FINE_TUNING):
        layer.transition(0, to, "test")
    x = torch.randn(6, 3, requires_grad=True)
    h = layer.host(x)
    out = layer(x)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, 0], h[:, 0])  # the poisoned channel falls back to the host value
    assert torch.allclose(out[:, 1], 2 * h[:, 1])  # the finite part of the seed is blended (alpha 1)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


def test_telemetry_is_real_and_read_per_seed():
    layer = K.KasminaLayer(nn.Linear(3, 4), num_seeds=2, name="fc")
    layer.germinate(0, "residual_mlp")
    x = torch.randn(10, 3)
    h = layer.host(x).detach()
    out = layer(x)
    (out * 2).sum().backward()
    rows = layer.seed_table()
    for i, row in enumerate(rows):
        chunk = h[:, 2 * i : 2 * i + 2].double()
        assert row.telemetry["mean"] == pytest.approx(float(chunk.mean()))
        assert row.telemetry["variance"] == pytest.approx(float(chunk.var(unbiased=False)), rel=1e-6)
        assert row.telemetry["dead_fraction"] == pytest.approx(float((chunk <= 0).double().mean()))
        assert row.telemetry["samples"] == 20
        # d(sum(2*out))/d(out) = 2 everywhere: sqrt(sum(g^2)/steps) = sqrt(4 * 20)
        assert row.telemetry["gradient_norm"] == pytest.approx((4 * 20) ** 0.5)
    assert rows[0].state == S.TRAINING and rows[0].blueprint_id == "residual_mlp"
    assert rows[1].state == S.DORMANT and rows[1].parameter_count == 0
    assert rows[0].parameter_count == sum(p.numel() for p in layer.seed_parameters(0))
    slot = rows[0].to_proto()
    assert slot.layer_name == "fc" and slot.telemetry.samples == 20 and not slot.has_contribution
    # eval-mode forwards (validation, counterfactuals) do not pollute the telemetry
    layer.eval()
    layer(x)
    assert layer.seed_table()[0].telemetry["samples"] == 20
    layer.reset_telemetry()
    assert layer.seed_table()[0].telemetry["samples"] == 0


def test_new_parameters_keep_host_optimizer_state():
    torch.manual_seed(3)
    model = K.wrap(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), ["0"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    host_state = {id(p): copy.deepcopy(opt.state[p]) for p in model.parameters()}
    model[0].germinate(0, "residual_mlp")
    new = K.new_parameters(model, opt)
    assert {id(p) for p in new} == {id(p) for p in model[0].seed_parameters(0)}
    opt.add_param_group({"params": new})
    assert K.new_parameters(model, opt) == []
    for p in model[0].host.parameters():
        assert torch.equal(opt.state[p]["exp_avg"], host_state[id(p)]["exp_avg"])
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    assert all(p in opt.state for p in new)
    model[0].cull(0, "test")
    assert K.drop_stale_parameters(model, opt) == len(new)
    assert sum(len(g["params"]) for g in opt.param_groups) == 4


def _grown_model():
    torch.manual_seed(4)
    model = K.wrap(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1)),
                   ["0", "2"], seeds_per_layer=2)
    model[0].germinate(0, "conv3x3")
    model[0].germinate(1, "bottleneck", await_kernel=True)
    model[2].germinate(1, "conv1x1")
    model[2].transition(1, S.GRAFTING, "test")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3, 5, 5)).square().mean().backward()
        opt.step()
        for layer in (model[0], model[2]):
            layer.advance(0.25)
    return model


def test_state_dict_round_trip_restores_grown_seeds_and_table():
    model = _grown_model()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    restored_sd = torch.load(buffer, weights_only=True)
    fresh = K.wrap(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1)),
                   ["0", "2"], seeds_per_layer=2)
    fresh.load_state_dict(restored_sd)
    for a, b in ((model[0], fresh[0]), (model[2], fresh[2])):
        assert [a.state_of(i) for i in range(2)] == [b.state_of(i) for i in range(2)]
        assert a.num_active == b.num_active and a.steps_in_state(0) == b.steps_in_state(0)
        assert set(a.seeds.keys()) == set(b.seeds.keys())
        for key in ("state", "alpha", "steps_in_state", "telemetry", "blueprint_index"):
            assert torch.equal(getattr(a.table, key), getattr(b.table, key))
        assert [r.blueprint_id for r in a.seed_table()] == [r.blueprint_id for r in b.seed_table()]
    assert fresh[0].state_of(1) == S.GERMINATED and fresh[2].state_of(1) == S.GRAFTING
    assert float(fresh[2].table.alpha[1]) == 0.75
    x = torch.randn(2, 3, 5, 5)
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))
    # The restored GERMINATED seed still receives its kernel and trains.
    fresh[0].attach_kernel(1)
    assert fresh[0].state_of(1) == S.TRAINING


def test_loading_an_older_snapshot_removes_seeds_grown_since():
    model = K.wrap(nn.Sequential(nn.Linear(4, 8)), ["0"], seeds_per_layer=2)
    snapshot = copy.deepcopy(model.state_dict())
    x = torch.randn(3, 4)
    before = model(x)
    model[0].germinate(0, "residual_mlp")
    model[0].transition(0, S.GRAFTING, "test")
    model.load_state_dict(snapshot)
    assert model[0].state_of(0) == S.DORMANT and len(model[0].seeds) == 0 and model[0].num_active == 0
    assert torch.equal(model(x), before)


def test_germinate_with_an_exported_artifact_module():
    spec = CATALOG["residual_mlp"]
    built = K.build_seed_module(spec, 4, (3, 4))
    program = torch.export.export(built, (torch.randn(3, 4),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=2, max=64)},))
    layer = K.KasminaLayer(nn.Linear(4, 8), num_seeds=2, name="fc")
    layer.germinate(1, spec, module=program.module(), kernel_id="k-123")
    assert layer.state_of(1) == S.TRAINING and layer.seed_table()[1].kernel_id == "k-123"
    x = torch.randn(5, 4)
    out = layer(x)
    assert torch.equal(out, layer.host(x))
    out.square().sum().backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in layer.seed_parameters(1))


def test_layer_argument_errors():
    with pytest.raises(ValueError, match="divide the 8 output channels"):
        K.KasminaLayer(nn.Linear(3, 8), num_seeds=3)
    with pytest.raises(ValueError, match="pass channels=C"):
        K.KasminaLayer(nn.ReLU())
    with pytest.raises(ValueError, match="spatial_dims"):
        K.KasminaLayer(nn.ReLU(), channels=4)
    layer = K.KasminaLayer(nn.Linear(3, 8), num_seeds=2, name="fc")
    with pytest.raises(IndexError, match="seeds 0..1"):
        layer.germinate(2, "residual_mlp")
    with pytest.raises(BlueprintError, match="conv3x3.*input_kind"):
        layer.germinate(0, "conv3x3")
    assert layer.state_of(0) == S.DORMANT
    layer.germinate(0, "residual_mlp")
    with pytest.raises(ValueError, match=r"expected \[N, 8\]"):
        layer._forward_live(torch.randn(2, 6))
