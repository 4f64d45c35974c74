"""Urza's Prometheus gauges: blueprints, artifacts and their bytes by status."""

from __future__ import annotations

import asyncio

from prometheus_client.core import GaugeMetricFamily

from esper.serving.metrics import Sampler
from esper.urza.library import UrzaLibrary


def urza_sampler(library: UrzaLibrary) -> Sampler:
    """Reads `library.stats()` (one SQL query, off the event loop) at each scrape."""

    async def sample() -> list[GaugeMetricFamily]:
        stats = await asyncio.to_thread(library.stats)
        blueprints = GaugeMetricFamily("esper_urza_blueprints", "Blueprints registered in Urza")
        blueprints.add_metric([], stats["blueprints"])
        artifacts = GaugeMetricFamily("esper_urza_artifacts", "Kernel artifacts in Urza by status", labels=["status"])
        size = GaugeMetricFamily("esper_urza_artifact_bytes", "Bytes of kernel artifacts in Urza by status",
                                 labels=["status"])
        for status, n in sorted(stats["artifacts"].items()):
            artifacts.add_metric([status], n)
            size.add_metric([status], stats["artifact_bytes"][status])
        return [blueprints, artifacts, size]

    return sample
