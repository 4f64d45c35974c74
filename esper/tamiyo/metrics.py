"""Tamiyo's Prometheus metrics: replay buffer size and decisions by action."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from esper.serving.metrics import Sampler
from esper.tamiyo.service import TamiyoCore


def tamiyo_sampler(core: TamiyoCore) -> Sampler:
    """Reads the core's counters at each scrape."""

    async def sample() -> list[GaugeMetricFamily | CounterMetricFamily]:
        replay = GaugeMetricFamily("esper_tamiyo_replay_buffer_reports", "Field reports in the replay buffer")
        replay.add_metric([], len(core.replay))
        decisions = CounterMetricFamily("esper_tamiyo_decisions", "Decisions returned since start, by action",
                                        labels=["action"])
        for action, n in sorted(dict(core.decisions_by_action).items()):
            decisions.add_metric([action.removeprefix("DECISION_ACTION_")], n)
        return [replay, decisions]

    return sample
