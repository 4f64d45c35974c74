"""The Pareto growth protocol: its statistics, its job plan, and one tiny real run end to end."""

from __future__ import annotations

import json
import math

import pytest

from esper.bench.pareto import aggregate, budget_overrides, check_targets
from esper.bench.pareto_plan import ESPER, MATCHED, STATIC, Job, ParetoPlan, arm_id, choose_lr, matched_steps
from esper.bench.pareto_stats import (
    flops_to_reach,
    frontier_arm,
    mean_ci,
    paired,
    wall_per_flop_ratio,
)


def _run(test: float, val: float, flops: float, params: int = 100, wall: float = 1.0, job=None) -> dict:
    return {"test_acc": test, "final_val_acc": val, "flops": {"total": flops}, "params_final": params,
            "wall_s": wall, "adaptations": [], "job": job or {}}


def test_mean_ci_matches_the_t_interval():
    out = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert out["mean"] == 2.5 and out["n"] == 4
    half = 3.182446305284263 * out["sd"] / 2.0  # t(0.975, 3) * sd / sqrt(4)
    assert out["ci_low"] == pytest.approx(2.5 - half) and out["ci_high"] == pytest.approx(2.5 + half)
    assert math.isnan(mean_ci([1.0])["sd"])


def test_paired_difference_and_p_value():
    a = [90.0, 91.0, 92.0, 93.0, 94.0]
    b = [88.9, 90.1, 90.8, 92.2, 92.9]
    d = paired(a, b)
    assert d["mean"] == pytest.approx(1.02) and d["wins"] == 5 and d["ties"] == 0
    assert d["p_value"] < 0.001 and d["ci_low"] > 0
    same = paired([1.0, 2.0], [1.0, 2.0])
    assert same["p_value"] == 1.0 and same["ties"] == 2


def test_frontier_is_the_best_validation_arm_that_costs_no_more():
    static = {"small": {"val_acc": 80.0, "flops": 1.0}, "big": {"val_acc": 90.0, "flops": 4.0},
              "mid": {"val_acc": 85.0, "flops": 2.0}}
    assert frontier_arm(static, 3.0) == "mid"
    assert frontier_arm(static, 4.0) == "big"
    assert frontier_arm(static, 0.5) is None


def test_flops_to_reach_interpolates_in_log_flops():
    curve = [(1e9, 80.0), (4e9, 90.0), (2e9, 86.0)]
    f, how = flops_to_reach(curve, 88.0)
    assert how == "interpolated"
    assert f == pytest.approx(math.exp(math.log(2e9) + 0.5 * (math.log(4e9) - math.log(2e9))))
    assert flops_to_reach(curve, 79.0) == (1e9, "at or below the smallest budget")
    assert flops_to_reach(curve, 95.0) == (None, "not reached")


def test_wall_per_flop_ratio_is_a_geometric_mean_over_common_seeds():
    esper = {0: _run(0.9, 0.9, 2.0, wall=4.0), 1: _run(0.9, 0.9, 2.0, wall=1.0)}
    static = {0: _run(0.9, 0.9, 1.0, wall=1.0), 1: _run(0.9, 0.9, 1.0, wall=1.0), 2: _run(0.9, 0.9, 1.0)}
    out = wall_per_flop_ratio(esper, static)
    assert out["n"] == 2 and out["geomean"] == pytest.approx(1.0) and out["max"] == 2.0 and out["min"] == 0.5


def test_choose_lr_on_validation_with_ties_to_the_first_rate():
    results = {Job("a", "", lr, s).key: _run(0.0, val, 1.0)
               for lr, vals in ((0.1, (0.8, 0.8)), (0.2, (0.9, 0.85)), (0.4, (0.9, 0.85))) for s, val in
               zip((0, 1), vals, strict=True)}
    assert choose_lr(results, "a", [0.1, 0.2, 0.4], [0, 1]) == 0.2
    assert choose_lr(results, "a", [0.1, 0.2, 0.4, 0.8], [0, 1]) is None  # a run is missing


def test_matched_steps_spend_at_most_the_budget():
    steps = matched_steps(1e6, forward_per_sample=100.0, batch_size=10, val_samples=50, steps_per_epoch=4)
    cost = lambda n: n * 3 * 100 * 10 + math.ceil(n / 4) * 100 * 50  # noqa: E731
    assert cost(steps) <= 1e6 < cost(steps + 1)


def test_budget_overrides_scale_the_whole_schedule():
    assert budget_overrides(2.0, 30, 1.0, 50) == ["train.epochs=60", "train.max_steps=0", "schedule.warmup_epochs=2"]
    assert budget_overrides(0.25, 30, 1.0, 50) == ["train.epochs=8", "train.max_steps=375",
                                                   "schedule.warmup_epochs=0.25"]


def _plan(**kw) -> ParetoPlan:
    args = dict(widths=[4, 8], budgets=[0.5, 1.0], lr_grid=[0.1, 0.2], seeds=[0, 1, 2], tune_seeds=2,
                width_for_params=lambda p: int(p // 10), static_costs=lambda w: (10.0 * w, 4, 8, 5))
    args.update(kw)
    return ParetoPlan(**args)


def test_plan_tunes_first_then_runs_the_other_seeds_at_the_chosen_rate():
    plan = _plan()
    first = plan.ready({})
    assert {j.seed for j in first} == {0, 1} and {j.lr for j in first} == {0.1, 0.2}
    assert not any(j.kind == MATCHED for j in first)  # needs Esper's final size first
    results = {}
    for j in first:
        val = 0.9 if j.lr == 0.2 else 0.8
        results[j.key] = _run(0.9, val, 1000.0 * (j.budget or 1), params=60 if j.kind == ESPER else 40)
    then = plan.ready(results)
    rest = [j for j in then if j.kind != MATCHED and j.arm != arm_id(STATIC, 6, 1.0)]
    assert {(j.seed, j.lr) for j in rest} == {(2, 0.2)}
    assert plan.final_width(results) == 6
    extra = [j for j in then if j.arm == arm_id(STATIC, 6, 1.0)]  # Esper's final size joins the static arms
    assert extra and all(j.seed in (0, 1) for j in extra)
    matched = [j for j in then if j.kind == MATCHED]
    assert {j.seed for j in matched} == {0, 1}
    assert all(j.max_steps == matched_steps(1000.0, 60.0, 4, 8, 5) for j in matched)


def test_plan_only_static_plans_no_esper_runs():
    plan = _plan(kinds=frozenset({STATIC}))
    assert {j.kind for j in plan.ready({})} == {STATIC}


def test_aggregate_compares_esper_with_the_frontier_and_the_target():
    plan = _plan(lr_grid=[0.1], budgets=[1.0], widths=[4, 6], tune_seeds=3)
    results = {}
    for s in plan.seeds:
        for w, acc in ((4, 0.80), (6, 0.86)):
            results[Job(arm_id(STATIC, w, 1.0), "", 0.1, s).key] = _run(acc + 0.01 * s, acc, 1000.0 * w,
                                                                          params=10 * w, job={"width": w, "budget": 1.0})
        results[Job(arm_id(ESPER, budget=1.0), "", 0.1, s).key] = _run(0.88 + 0.01 * s, 0.88, 5000.0, params=60,
                                                                       job={"budget": 1.0})
        results[Job(arm_id(MATCHED, 6), "", 0.1, s).key] = _run(0.85 + 0.012 * s, 0.85, 5000.0, params=60,
                                                                job={"width": 6, "budget": 1.0})
    agg = aggregate(results, plan)
    assert agg["final_width"] == 6
    f = agg["frontier"]["1"]
    assert f["frontier_arm"] == arm_id(STATIC, 4, 1.0)  # static-w6 costs more than Esper's 5000
    assert f["vs_frontier"]["mean"] == pytest.approx(8.0)
    assert agg["target"]["vs_esper"]["mean"] == pytest.approx(2.0)
    assert agg["target_matched"]["vs_esper"]["mean"] == pytest.approx(3.0 - 0.2, abs=1e-9)
    assert agg["flops_to_reach"]["how"] == "at or below the smallest budget"
    names = {c["target"]: c["met"] for c in check_targets(agg)}
    assert names["never below the static frontier by more than 0.5 points at any budget"] is True


def test_tiny_pareto_run_writes_markdown_plot_and_json(tmp_path):
    from esper.bench.growth import main

    out = tmp_path / "results" / "growth_pareto_digits"
    argv = ["--protocol", "pareto", "--dataset", "digits", "--seeds", "2", "--epochs", "2", "--widths", "8", "12",
            "--budgets", "0.5", "1", "--lr-grid", "0.05", "--override", "model.width=8", "--override",
            "data.train_limit=200", "--override", "train.torch_threads=1", "--workdir", str(tmp_path / "w"),
            "--output", str(out)]
    assert main(argv) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["dataset"] == "digits" and report["complete"]
    assert {"esper-b0.5", "esper-b1", "static-w8-b1", "static-w12-b0.5"} <= set(report["aggregate"]["arms"])
    md = out.with_suffix(".md").read_text()
    assert "esper-bench growth --protocol pareto" in md and "2 paired seeds instead of 20" in md
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = sorted(p.name for p in (tmp_path / "w" / "runs").rglob("*.json"))
    assert len(runs) >= 2 * 6
    # Resuming reruns nothing: every run file is reused as is.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "w" / "runs").rglob("*.json")}
    assert main(argv) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_a_labelled_variant_is_compared_with_the_default_esper_arms():
    plan = _plan(lr_grid=[0.1], budgets=[1.0], widths=[4], esper_label="fill_stats", tune_seeds=3)
    results = {}
    for s in plan.seeds:
        results[Job(arm_id(STATIC, 4, 1.0), "", 0.1, s).key] = _run(0.80, 0.8, 4000.0, 40, job={"width": 4, "budget": 1.0})
        results[Job("esper-b1", "", 0.1, s).key] = _run(0.85 + 0.01 * s, 0.85, 5000.0, 60, job={"budget": 1.0})
        results[Job("fill_stats-b1", "", 0.1, s).key] = _run(0.84 + 0.01 * s + 0.001 * s * s, 0.84, 5000.0, 60,
                                                             job={"budget": 1.0})
    agg = aggregate(results, plan)
    ab = agg["ablation"]["1"]
    assert ab["base"] == "esper-b1" and ab["variant"] == "fill_stats-b1"
    assert ab["variant_minus_base"]["mean"] == pytest.approx(-1.0 + 0.1 * (0 + 1 + 4) / 3)
    assert "esper-b1" not in agg["arms"]  # the default arms are the baseline here, not an arm of the plan


def test_bad_arguments_and_missing_data_are_one_line_errors(tmp_path, capsys):
    from esper.bench.growth import main

    base = ["--protocol", "pareto", "--workdir", str(tmp_path / "w")]
    assert main([*base, "--dataset", "cifar10", "--override", f"data.data_dir={tmp_path}"]) == 2
    assert "CIFAR-10: missing file" in capsys.readouterr().err
    assert main([*base, "--dataset", "digits", "--budgets", "1", "1"]) == 2
    assert "--budgets: expected distinct positive multipliers" in capsys.readouterr().err
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "protocol.json").write_text('{"config": "configs/mnist1d.yaml", "overrides": []}')
    assert main([*base, "--dataset", "digits", "--override", "data.train_limit=100"]) == 2
    assert "holds runs of another protocol (differs in ['config', 'overrides'])" in capsys.readouterr().err


def test_jobs_are_claimed_once_across_invocations(tmp_path):
    import os
    import subprocess
    import sys

    from esper.bench.pareto import claim, result_path

    job = Job("static-w8-b1", STATIC, 0.1, 0, 8, 1.0)
    assert claim(tmp_path, job) and claim(tmp_path, job)  # ours, and still ours
    lock = result_path(tmp_path, job).with_suffix(".lock")
    assert lock.read_text() == str(os.getpid())
    lock.write_text(str(os.getppid()))  # held by a live process
    assert not claim(tmp_path, job)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(dead.stdout.strip())  # held by a process that is gone: taken over
    assert claim(tmp_path, job) and lock.read_text() == str(os.getpid())
