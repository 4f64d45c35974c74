"""The growth benchmark's arithmetic and a tiny real run of all four arms."""

from __future__ import annotations

import json
import math

import pytest

from esper.bench.growth import _matched_steps, aggregate, main


def test_matched_steps_fit_the_budget():
    target = {"flops": {"forward_per_sample_final": 100.0}, "batch_size": 10, "val_samples": 50,
              "steps_per_epoch": 4}
    per_step, per_eval = 3 * 100 * 10, 100 * 50
    steps = _matched_steps(target, budget=10 * per_step + 3 * per_eval)
    assert steps == 10
    cost = steps * per_step + math.ceil(steps / 4) * per_eval
    assert cost <= 10 * per_step + 3 * per_eval


def _arm(acc: float, flops: float = 1.0) -> dict:
    return {"test_acc": acc, "flops": {"total": flops}, "wall_s": 1.0, "params_final": 10, "adaptations": []}


def test_aggregate_paired_differences():
    per_seed = [{"host": _arm(0.80), "esper": _arm(0.86), "target": _arm(0.90), "target@matched": _arm(0.85)},
                {"host": _arm(0.82), "esper": _arm(0.87), "target": _arm(0.91), "target@matched": _arm(0.88)},
                {"host": _arm(0.81), "esper": _arm(0.88), "target": _arm(0.89), "target@matched": _arm(0.86)}]
    agg = aggregate(per_seed)
    d = agg["paired"]["esper - host"]
    assert d["n"] == 3 and d["wins"] == 3 and d["mean"] == pytest.approx(6.0)
    assert 0 < d["p_value"] < 0.05
    assert agg["paired"]["esper - target"]["wins"] == 0
    assert agg["arms"]["esper"]["test_acc"][0] == pytest.approx(87.0)


@pytest.mark.integration
def test_growth_bench_runs_all_arms_on_digits(tmp_path):
    out = tmp_path / "r.json"
    assert main(["--dataset", "digits", "--seeds", "1", "--epochs", "4", "--workdir", str(tmp_path / "w"),
                 # the seed is kept whatever it measures, so the target arm is wider than the host
                 "--override", "lifecycle.min_contribution=-1",
                 "--json", str(out), "--markdown", str(tmp_path / "r.md")]) == 0
    result = json.loads(out.read_text())
    (seed,) = result["per_seed"]
    esper, matched = seed["esper"], seed["target@matched"]
    assert matched["flops"]["total"] <= esper["flops"]["total"]  # stopped at the grown run's compute
    assert seed["target"]["params_final"] > seed["host"]["params_final"]
    assert "esper - target@matched" in (tmp_path / "r.md").read_text()
