"""CPU partitioning for runs with local services (esper.cpus, services.cpus)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from esper import cpus
from esper.tolaria.config import ConfigError, load_config
from esper.tolaria.services import step_time_stats
from tests.system.helpers import DEV


@pytest.mark.parametrize(("text", "expected"), [("3", [3]), ("2-3", [2, 3]), ("0,2,4-5", [0, 2, 4, 5]),
                                                 (" 1 , 1-2", [1, 2])])
def test_parse_cpu_list(text, expected):
    assert cpus.parse_cpu_list(text) == expected


@pytest.mark.parametrize("text", ["", "a", "3-1", "-2", "1-x", ","])
def test_parse_cpu_list_rejects_bad_lists(text):
    with pytest.raises(cpus.CpuSpecError, match="CPU list"):
        cpus.parse_cpu_list(text)


def test_format_cpus():
    assert cpus.format_cpus([5, 0, 1, 2]) == "0-2,5"
    assert cpus.format_cpus([7]) == "7"


@pytest.mark.skipif(not cpus.supported(), reason="needs os.sched_setaffinity (Linux)")
def test_plan_partition():
    assert cpus.plan_partition("auto", [0]) is None  # one CPU: nothing to split
    assert cpus.plan_partition("off", [0, 1, 2, 3]) is None
    assert cpus.plan_partition("auto", [0, 1]) == cpus.Partition((0,), (1,))
    assert cpus.plan_partition("AUTO", [0, 1, 2, 3]) == cpus.Partition((0, 1, 2), (3,))
    assert cpus.plan_partition("auto", list(range(8))) == cpus.Partition(tuple(range(6)), (6, 7))
    assert cpus.plan_partition("0", [0, 1, 2]) == cpus.Partition((1, 2), (0,))
    with pytest.raises(cpus.CpuSpecError, match="not available to this process"):
        cpus.plan_partition("5", [0, 1])
    with pytest.raises(cpus.CpuSpecError, match="leaves no CPU for training"):
        cpus.plan_partition("0-1", [0, 1])


@pytest.mark.skipif(not cpus.supported() or len(cpus.allowed_cpus()) < 2, reason="needs 2 CPUs and affinity")
def test_on_cpus_moves_the_thread_and_what_it_starts_then_restores():
    before = os.sched_getaffinity(0)
    last = max(before)
    with cpus.on_cpus([last]):
        assert os.sched_getaffinity(0) == {last}
        child = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                               capture_output=True, text=True, check=True)
        assert child.stdout.strip() == f"[{last}]"
    assert os.sched_getaffinity(0) == before
    with cpus.on_cpus(None):
        assert os.sched_getaffinity(0) == before


def test_services_cpus_config_is_checked_and_named():
    assert load_config(DEV, ["services.cpus=1"]).services.cpus == "1"  # an int on the command line
    assert load_config(DEV, ["services.cpus=off"]).services.cpus == "off"
    with pytest.raises(ConfigError, match=r"services\.cpus: .*expected auto, off or a CPU list"):
        load_config(DEV, ["services.cpus=banana"])


def test_step_time_stats_by_phase():
    samples = [(0.002, "", 1), (0.002, "", 2), (0.0021, "compile", 3), (0.0025, "compile", 4),
               (0.004, "load", 5), (0.002, "", 6)]
    stats = step_time_stats(samples)
    assert stats["all"]["n"] == 6 and stats["all"]["median_ms"] == pytest.approx(2.05)
    assert stats["no_adaptation"]["n"] == 3
    assert stats["during_compile"]["n"] == 2 and stats["during_compile"]["max_ms"] == pytest.approx(2.5)
    assert stats["max_during_compile_over_median"] == pytest.approx(2.5 / 2.05)
    assert stats["max_during_load_over_median"] == pytest.approx(4.0 / 2.05)
    assert stats["slowest"][0] == {"step": 5, "ms": pytest.approx(4.0), "phase": "load"}
    assert step_time_stats([])["all"] == {"n": 0}
