"""`esper-bench growth-wall` on a tiny digits run: both runs, the ratio and the profile table."""

from __future__ import annotations

import json

from esper.bench.growth_wall import main


def test_growth_wall_reports_the_ratio_and_where_esper_spends_time(tmp_path):
    out = tmp_path / "wall"
    assert main(["--config", "configs/development.yaml", "--override", "train.epochs=4", "--override",
                 "data.train_limit=320", "--override", "lifecycle.min_contribution=-1", "--top", "10",
                 "--workdir", str(tmp_path / "w"), "--output", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    (r,) = report["rounds"]
    assert r["ratio"] == (r["esper_wall_s"] / r["esper_flops"]) / (r["static_wall_s"] / r["static_flops"])
    assert r["cpu_ratio"] == (r["esper_cpu_s"] / r["esper_flops"]) / (r["static_cpu_s"] / r["static_flops"])
    assert r["esper_cpu_s"] > 0 and r["static_cpu_s"] > 0
    # The unprofiled pair trains the same runs (same FLOPs) without the profiler.
    assert r["unprofiled_ratio"] == ((r["unprofiled_esper_wall_s"] / r["esper_flops"])
                                     / (r["unprofiled_static_wall_s"] / r["static_flops"]))
    assert r["unprofiled_cpu_ratio"] == ((r["unprofiled_esper_cpu_s"] / r["esper_flops"])
                                         / (r["unprofiled_static_cpu_s"] / r["static_flops"]))
    assert report["unprofiled_cpu_ratio_median"] == r["unprofiled_cpu_ratio"]
    # Per-phase step times: every timed step is filed once, and the rest is the boundaries' time.
    for side in ("esper", "static"):
        phases = r[f"{side}_phases"]
        timed = sum(p["total_s"] for p in phases["phases"].values())
        assert phases["boundary_s"] == r[f"unprofiled_{side}_cpu_s"] - timed
        steps = sum(p["steps"] for p in phases["phases"].values())
        assert 0 < steps < 4 * 10  # 4 epochs of 10 steps, the first step of each not timed
    assert list(r["static_phases"]["phases"]) == ["all dormant"]
    assert r["esper_params"] > 0 and r["static_params"] > 0
    functions = [t["function"] for t in report["top"]]
    assert len(functions) == 10 and any("trainer.py" in f for f in functions)
    text = out.with_suffix(".md").read_text()
    assert "Median ratio" in text and "without the profiler" in text


def test_growth_wall_can_skip_the_unprofiled_pair(tmp_path):
    out = tmp_path / "wall"
    assert main(["--config", "configs/development.yaml", "--override", "train.epochs=2", "--override",
                 "data.train_limit=320", "--no-unprofiled", "--workdir", str(tmp_path / "w"),
                 "--output", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert "unprofiled_ratio" not in report["rounds"][0] and "unprofiled_ratio_median" not in report
    assert "without the profiler" not in out.with_suffix(".md").read_text()
