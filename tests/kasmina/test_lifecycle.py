"""Lifecycle transition table, gates, events, embargo and the driver on real training steps."""

import math

import pytest
import torch
from torch import nn

import esper.kasmina as K
from esper.kasmina.lifecycle import (
    TRANSITIONS,
    AlignmentWindow,
    IllegalTransitionError,
    LifecycleConfig,
    check_transition,
    contribution_gate,
    step_gate,
    training_gate,
)
from esper.lifecycle import SeedLifecycleState as S
from esper.models import MLP

EXPECTED_LEGAL = {
    (S.DORMANT, S.GERMINATED),
    (S.GERMINATED, S.TRAINING), (S.GERMINATED, S.CANCELLED), (S.GERMINATED, S.ROLLED_BACK),
    (S.TRAINING, S.GRAFTING), (S.TRAINING, S.CULLED), (S.TRAINING, S.CANCELLED), (S.TRAINING, S.ROLLED_BACK),
    (S.GRAFTING, S.STABILIZATION), (S.GRAFTING, S.CULLED), (S.GRAFTING, S.ROLLED_BACK),
    (S.STABILIZATION, S.EVALUATING), (S.STABILIZATION, S.CULLED), (S.STABILIZATION, S.ROLLED_BACK),
    (S.EVALUATING, S.FINE_TUNING), (S.EVALUATING, S.CULLED), (S.EVALUATING, S.ROLLED_BACK),
    (S.FINE_TUNING, S.FOSSILIZED), (S.FINE_TUNING, S.CULLED), (S.FINE_TUNING, S.ROLLED_BACK),
    (S.CULLED, S.DORMANT), (S.CANCELLED, S.DORMANT), (S.ROLLED_BACK, S.DORMANT),
}


def test_table_covers_all_eleven_states():
    assert set(TRANSITIONS) == set(S)
    assert len([s for s in S if s != S.UNSPECIFIED]) == 11


@pytest.mark.parametrize("src", list(S))
@pytest.mark.parametrize("dst", list(S))
def test_every_pair_is_legal_exactly_when_expected(src, dst):
    if (src, dst) in EXPECTED_LEGAL:
        check_transition(src, dst)
    else:
        with pytest.raises(IllegalTransitionError) as info:
            check_transition(src, dst, "layer 'x' seed 0")
        assert src.name in str(info.value) and dst.name in str(info.value)
        assert "layer 'x' seed 0" in str(info.value)


def _layer(num_seeds=2, listener=None):
    layer = K.KasminaLayer(nn.Linear(6, 8), num_seeds=num_seeds, name="fc")
    events = []
    layer.add_listener(listener or events.append)
    return layer, events


def test_main_path_through_layer_emits_events_and_sets_alpha():
    layer, events = _layer()
    layer.clock.global_step, layer.clock.epoch = 17, 3
    layer.germinate(1, "residual_mlp")
    for to in (S.GRAFTING, S.STABILIZATION, S.EVALUATING, S.FINE_TUNING, S.FOSSILIZED):
        layer.transition(1, to, f"to {to.name}")
        expected_alpha = 0.0 if to == S.GRAFTING else 1.0
        assert float(layer.table.alpha[1]) == expected_alpha
        assert int(layer.table.state[1]) == int(to)
    assert [(e.from_state, e.to_state) for e in events] == [
        (S.DORMANT, S.GERMINATED), (S.GERMINATED, S.TRAINING), (S.TRAINING, S.GRAFTING),
        (S.GRAFTING, S.STABILIZATION), (S.STABILIZATION, S.EVALUATING), (S.EVALUATING, S.FINE_TUNING),
        (S.FINE_TUNING, S.FOSSILIZED),
    ]
    assert all(e.layer == "fc" and e.seed == 1 and e.step == 17 and e.epoch == 3 for e in events)
    assert events[-1].reason == "to FOSSILIZED"
    proto = events[-1].to_proto("run-1")
    assert proto.to_state == int(S.FOSSILIZED) and proto.layer_name == "fc" and proto.run_id == "run-1"
    with pytest.raises(IllegalTransitionError, match="FOSSILIZED -> CULLED"):
        layer.cull(1, "too late")
    assert layer.state_of(0) == S.DORMANT


def test_illegal_transition_through_layer_names_states_and_changes_nothing():
    layer, events = _layer()
    with pytest.raises(IllegalTransitionError, match="DORMANT -> GRAFTING"):
        layer.transition(0, S.GRAFTING, "skip ahead")
    with pytest.raises(IllegalTransitionError, match="DORMANT -> CULLED"):
        layer.cull(0, "nothing to cull")
    layer.germinate(0, "lora_adapter")
    with pytest.raises(IllegalTransitionError, match="TRAINING -> GERMINATED"):
        layer.germinate(0, "lora_adapter")
    assert layer.state_of(0) == S.TRAINING and len(events) == 2


def test_cancel_and_rollback_free_the_slot_at_once():
    layer, events = _layer()
    layer.germinate(0, "residual_mlp", await_kernel=True)
    assert layer.state_of(0) == S.GERMINATED and layer.num_active == 0
    layer.cancel(0, "compile failed")
    assert layer.state_of(0) == S.DORMANT and "0" not in layer.seeds
    layer.germinate(0, "residual_mlp")
    layer.transition(0, S.GRAFTING, "aligned")
    with pytest.raises(IllegalTransitionError, match="GRAFTING -> CANCELLED"):
        layer.cancel(0, "host already touched")
    layer.rollback(0, "loss spike")
    assert layer.state_of(0) == S.DORMANT and int(layer.table.blueprint_index[0]) == -1
    assert [e.to_state for e in events][-2:] == [S.ROLLED_BACK, S.DORMANT]


def test_cull_embargo_counts_down_epochs_then_dormant():
    layer, events = _layer()
    layer.embargo_epochs = 2
    layer.germinate(0, "residual_mlp")
    layer.cull(0, "no improvement")
    assert layer.state_of(0) == S.CULLED and "0" not in layer.seeds and layer.num_active == 0
    assert int(layer.table.embargo[0]) == 2
    with pytest.raises(IllegalTransitionError, match="CULLED -> GERMINATED"):
        layer.germinate(0, "residual_mlp")
    assert layer.end_epoch() == []
    assert int(layer.table.embargo[0]) == 1 and layer.state_of(0) == S.CULLED
    done = layer.end_epoch()
    assert [(e.from_state, e.to_state, e.reason) for e in done] == [(S.CULLED, S.DORMANT, "embargo over")]
    layer.germinate(0, "residual_mlp")  # the slot is usable again
    assert layer.state_of(0) == S.TRAINING


def test_gates_on_measured_signals():
    cfg = LifecycleConfig(training_min_steps=10, training_max_steps=30, grafting_steps=5, stabilization_steps=3,
                          fine_tuning_epochs=2, min_contribution=0.01, min_alignment=0.1)
    aligned = AlignmentWindow(grad_dot_seed=-3.0, grad_sq=4.0, seed_sq=9.0)  # cosine 0.5
    opposed = AlignmentWindow(grad_dot_seed=3.0, grad_sq=4.0, seed_sq=9.0)
    assert aligned.cosine == pytest.approx(0.5) and AlignmentWindow(0, 0, 0).cosine == 0.0
    assert training_gate(9, aligned, cfg) is None
    assert training_gate(10, aligned, cfg).to_state == S.GRAFTING
    assert training_gate(20, opposed, cfg) is None
    culled = training_gate(30, opposed, cfg)
    assert culled.to_state == S.CULLED and "-0.5000" in culled.reason
    assert step_gate(S.GRAFTING, 4, cfg) is None and step_gate(S.GRAFTING, 5, cfg).to_state == S.STABILIZATION
    assert step_gate(S.STABILIZATION, 3, cfg).to_state == S.EVALUATING
    assert contribution_gate(S.EVALUATING, 1, 0.05, cfg).to_state == S.FINE_TUNING
    assert contribution_gate(S.EVALUATING, 1, 0.0, cfg).to_state == S.CULLED
    assert contribution_gate(S.FINE_TUNING, 1, 0.05, cfg) is None
    assert contribution_gate(S.FINE_TUNING, 2, 0.05, cfg).to_state == S.FOSSILIZED
    assert contribution_gate(S.FINE_TUNING, 1, math.nan, cfg).to_state == S.CULLED


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="grafting_steps"):
        LifecycleConfig(grafting_steps=0)
    with pytest.raises(ValueError, match="training_max_steps"):
        LifecycleConfig(training_min_steps=50, training_max_steps=10)
    with pytest.raises(ValueError, match="embargo_epochs"):
        LifecycleConfig(embargo_epochs=-1)
    assert LifecycleConfig(grafting_steps=4).alpha_step == 0.25


def _task(seed=0, n=512):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    y = (x[:, :5].sum(1) * x[:, 5:].sum(1) > 0).long() + 2 * (x[:, 0] > 0).long()
    return x, y


def _run(cfg, epochs, steps_per_epoch=16, seed=0):
    torch.manual_seed(seed)
    x, y = _task(seed)
    xv, yv = _task(seed + 100, 256)
    model = K.wrap(MLP(10, 16, 4, depth=2), ["hidden.0", "hidden.1"], seeds_per_layer=2)

    def evaluate():
        model.eval()
        with torch.no_grad():
            score = -nn.functional.cross_entropy(model(xv), yv).item()
        model.train()
        return score

    driver = K.LifecycleDriver(model, cfg, evaluate=evaluate)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    layer = driver.site("hidden.1")
    layer.germinate(0, "residual_mlp")
    opt.add_param_group({"params": K.new_parameters(model, opt)})
    for _ in range(epochs):
        for b in range(steps_per_epoch):
            idx = slice(b * 32 % 512, b * 32 % 512 + 32)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            driver.step()
        driver.end_epoch()
    return driver, layer


def test_driver_takes_a_seed_through_the_whole_lifecycle_on_real_training():
    cfg = LifecycleConfig(training_min_steps=8, training_max_steps=200, gate_interval_steps=4, min_alignment=0.0,
                          grafting_steps=8, stabilization_steps=4, evaluation_epochs=1, fine_tuning_epochs=2,
                          min_contribution=-1.0)
    driver, layer = _run(cfg, epochs=6)
    path = [(e.from_state, e.to_state) for e in driver.events if e.layer == "hidden.1" and e.seed == 0]
    assert path == [
        (S.DORMANT, S.GERMINATED), (S.GERMINATED, S.TRAINING), (S.TRAINING, S.GRAFTING),
        (S.GRAFTING, S.STABILIZATION), (S.STABILIZATION, S.EVALUATING), (S.EVALUATING, S.FINE_TUNING),
        (S.FINE_TUNING, S.FOSSILIZED),
    ], path
    graft = next(e for e in driver.events if e.to_state == S.GRAFTING)
    assert "cosine" in graft.reason and graft.step >= cfg.training_min_steps
    fossil = next(e for e in driver.events if e.to_state == S.FOSSILIZED)
    row = layer.seed_table()[0]
    assert row.state == S.FOSSILIZED and row.alpha == 1.0 and row.last_contribution is not None
    assert f"{row.last_contribution:+.6f}" in fossil.reason
    assert row.telemetry["samples"] > 0 and row.telemetry["gradient_norm"] > 0


def test_driver_culls_a_seed_whose_contribution_is_too_small():
    cfg = LifecycleConfig(training_min_steps=8, training_max_steps=200, gate_interval_steps=4, min_alignment=0.01,
                          grafting_steps=4, stabilization_steps=2, evaluation_epochs=1, min_contribution=10.0,
                          embargo_epochs=1)
    driver, layer = _run(cfg, epochs=4)
    to = [e.to_state for e in driver.events if e.layer == "hidden.1"]
    assert S.CULLED in to and to[to.index(S.CULLED) + 1] == S.DORMANT
    culled = next(e for e in driver.events if e.to_state == S.CULLED)
    assert "contribution" in culled.reason and "EVALUATING" in culled.reason


def test_driver_culls_a_seed_that_never_aligns():
    # min_alignment 1.0 cannot be reached by a real seed; TRAINING ends in CULLED at training_max_steps.
    cfg = LifecycleConfig(training_min_steps=4, training_max_steps=12, gate_interval_steps=4, min_alignment=1.0)
    driver, _ = _run(cfg, epochs=1)
    culled = [e for e in driver.events if e.to_state == S.CULLED]
    assert len(culled) == 1 and culled[0].from_state == S.TRAINING and culled[0].step == 12
    assert "never aligned" in culled[0].reason


def test_driver_cancels_a_seed_whose_kernel_never_arrives():
    model = K.wrap(MLP(4, 8, 2, depth=1), ["hidden.0"])
    driver = K.LifecycleDriver(model, LifecycleConfig(germination_timeout_epochs=2))
    layer = driver.site("hidden.0")
    layer.germinate(0, "residual_mlp", await_kernel=True)
    driver.step()
    assert int(layer.table.steps_in_state[0]) == 1 and layer.steps_in_state(0) == 1
    driver.end_epoch()
    assert layer.state_of(0) == S.GERMINATED and layer.epochs_in_state(0) == 1
    driver.end_epoch()
    assert [e.to_state for e in driver.events][-2:] == [S.CANCELLED, S.DORMANT]


def test_driver_without_evaluate_says_what_is_missing():
    model = K.wrap(MLP(4, 8, 2, depth=1), ["hidden.0"])
    driver = K.LifecycleDriver(model, LifecycleConfig(evaluation_epochs=1))
    layer = driver.site("hidden.0")
    layer.germinate(0, "residual_mlp")
    for to in (S.GRAFTING, S.STABILIZATION, S.EVALUATING):
        layer.transition(0, to, "test")
    with pytest.raises(RuntimeError, match="evaluate callable"):
        driver.end_epoch()
    with pytest.raises(ValueError, match="no seed sites"):
        K.LifecycleDriver(MLP(4, 8, 2))


def test_driver_rejects_per_site_thresholds_for_unknown_sites():
    import pytest
    from torch import nn

    from esper.kasmina import LifecycleDriver, wrap

    model = wrap(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), target_layers=["0"], seeds_per_layer=1)
    assert LifecycleDriver(model, min_contribution_per_site={"0": 0.5}).site_config("0").min_contribution == 0.5
    with pytest.raises(ValueError, match="not seed sites"):
        LifecycleDriver(model, min_contribution_per_site={"2": 0.5})
