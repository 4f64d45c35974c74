"""Tezzeret's Prometheus gauges: compile queue depth and jobs by state."""

from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily

from esper.serving.metrics import Sampler
from esper.tezzeret.jobs import CompileJobs


def tezzeret_sampler(jobs: CompileJobs) -> Sampler:
    """Counts the job table on the server's loop at each scrape."""

    async def sample() -> list[GaugeMetricFamily]:
        counts = jobs.counts_by_state()
        depth = GaugeMetricFamily("esper_tezzeret_queue_depth", "Compile jobs waiting for a worker")
        depth.add_metric([], counts.get("COMPILE_JOB_STATE_QUEUED", 0))
        by_state = GaugeMetricFamily("esper_tezzeret_jobs", "Compile jobs in the job table by state",
                                     labels=["state"])
        for state, n in sorted(counts.items()):
            by_state.add_metric([state.removeprefix("COMPILE_JOB_STATE_")], n)
        return [depth, by_state]

    return sample
