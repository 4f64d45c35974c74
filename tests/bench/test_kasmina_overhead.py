"""The overhead benchmark runs end to end and returns every figure (no timing assertions)."""

import math

import pytest

from esper.bench import kasmina_overhead


@pytest.mark.slow
def test_figures_returns_all_ratios():
    figures = kasmina_overhead.figures(quick=True, device="cpu")
    for model in ("mlp", "cnn", "resnet18"):
        for kind in ("dormant", "active"):
            value = figures[f"{kind}_overhead_{model}"]
            assert math.isfinite(value) and value > 0
        assert figures[f"{model}_plain_ms"] > 0
    assert figures["resnet18_width"] == 8.0
    assert figures["dormant_wrapper_us"] < 1000  # microseconds per dormant call, not milliseconds
