"""Oona's Prometheus gauges: retained messages and offsets per topic, lag per consumer group."""

from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily

from esper.oona.bus import OonaBus
from esper.serving.metrics import Sampler


def oona_sampler(bus: OonaBus) -> Sampler:
    """Reads `bus.list_topics()` on the server's loop at each scrape."""

    async def sample() -> list[GaugeMetricFamily]:
        retained = GaugeMetricFamily("esper_oona_messages_retained", "Messages retained per topic", labels=["topic"])
        published = GaugeMetricFamily("esper_oona_next_offset", "Messages ever published per topic (next offset)",
                                      labels=["topic"])
        lag = GaugeMetricFamily("esper_oona_consumer_lag", "Messages not yet delivered to a consumer group",
                                labels=["topic", "group"])
        pending = GaugeMetricFamily("esper_oona_consumer_pending", "Messages delivered to a consumer group "
                                    "and not yet acknowledged", labels=["topic", "group"])
        for topic in await bus.list_topics():
            retained.add_metric([topic.name], topic.retained_messages)
            published.add_metric([topic.name], topic.next_offset)
            for group, n in sorted(topic.group_lag.items()):
                lag.add_metric([topic.name, group], n)
                pending.add_metric([topic.name, group], topic.group_pending.get(group, 0))
        return [retained, published, lag, pending]

    return sample
