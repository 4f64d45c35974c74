"""`esper-bench services --quick` end to end (real servers, real redis-server): every figure is
produced and is a positive number. Figures are not asserted against targets (benchmarks report
ratios; tests do not time things)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_quick_run_produces_every_figure(tmp_path, redis_server):
    out = tmp_path / "services.json"
    result = subprocess.run([sys.executable, "-m", "esper.bench.cli", "services", "--quick", "--json", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| Urza GetArtifact (metadata get) |" in result.stdout
    data = json.loads(out.read_text())
    for key in ("ping", "ping_bootstrap", "urza_get"):
        assert 0 < data[key]["p50_us"] <= data[key]["p99_us"]
    assert data["urza_download"]["median_mb_s"] > 0 and data["ping_throughput"]["calls_s"] > 0
    for key in ("raw_redis", "oona_redis", "oona_memory"):
        assert data[key]["delivered_msg_s"] > 0 and data[key]["loaded"]["n"] > 0
        assert data[key]["one_at_a_time"]["n"] > 0
        batched = data[f"{key}_batched"]
        assert batched["batch"] == 100 and batched["delivered_msg_s"] > 0 and batched["loaded"]["n"] > 0
