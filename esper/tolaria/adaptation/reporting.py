"""`Reporter`: what the run tells the services, without ever waiting for them. Lifecycle transitions
(``esper.lifecycle``), decisions (``esper.decisions``) and epoch metrics (``esper.metrics``) are
published on Oona; the outcome of every germination is reported to Tamiyo as a `FieldReport`.
Both wait in bounded backlogs, drained on the worker thread whenever their service is up."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

from esper.clients import OonaClient, ServiceLink, TamiyoClient, is_outage
from esper.clients.topics import DECISIONS_TOPIC, LIFECYCLE_TOPIC, METRICS_TOPIC, proto_content_type
from esper.errors import EsperError
from esper.lifecycle import SeedLifecycleState as S
from esper.tolaria.adaptation.records import Adaptation
from esper.tolaria.adaptation.worker import AdaptationWorker
from esper.v1 import common_pb2, oona_pb2

log = logging.getLogger("esper.tolaria.adaptation")

# Publishes and reports kept while their service is down (oldest dropped beyond this).
MAX_BACKLOG = 10_000
# The outcome reported for a germination whose seed reached one of these states.
OUTCOMES = {
    S.FOSSILIZED: common_pb2.ADAPTATION_OUTCOME_FOSSILIZED,
    S.CULLED: common_pb2.ADAPTATION_OUTCOME_CULLED,
    S.ROLLED_BACK: common_pb2.ADAPTATION_OUTCOME_ROLLED_BACK,
}
# Reason prefixes of cancellations that are reported to Tamiyo by the controller's compile-failure path itself.
COMPILE_FAILED_PREFIX = "compile failed"
UNAVAILABLE_PREFIX = "kernel unavailable"


class Reporter:
    """Backlogs of publishes (Oona) and outcome reports (Tamiyo) and the loop that sends them."""

    def __init__(self, run_id: str, worker: AdaptationWorker, call_timeout_s: float):
        self.run_id = run_id
        self.worker = worker
        self.call_timeout_s = call_timeout_s
        self.oona: ServiceLink[OonaClient] | None = None
        self.tamiyo: ServiceLink[TamiyoClient] | None = None
        self.publishes: deque[oona_pb2.PublishRequest] = deque(maxlen=MAX_BACKLOG)
        self.reports: deque[common_pb2.FieldReport] = deque(maxlen=MAX_BACKLOG)

    def connect(self, oona: ServiceLink[OonaClient] | None, tamiyo: ServiceLink[TamiyoClient] | None) -> None:
        self.oona, self.tamiyo = oona, tamiyo

    # ---------------------------------------------------------------- any thread

    def _request(self, topic: str, message: Any, key: str) -> oona_pb2.PublishRequest:
        return oona_pb2.PublishRequest(topic=topic, key=key, content_type=proto_content_type(message.DESCRIPTOR.name),
                                       payload=message.SerializeToString(), source=f"tolaria/{self.run_id}")

    def publish(self, topic: str, message: Any, key: str = "") -> None:
        """Queue `message` (an esper.v1 message) for Oona (training thread)."""
        self.worker.call_soon(self.publishes.append, self._request(topic, message, key))

    def publish_lifecycle(self, event: Any) -> None:
        msg = common_pb2.LifecycleEvent(run_id=self.run_id, layer_name=event.layer, seed_index=event.seed,
                                        from_state=int(event.from_state), to_state=int(event.to_state),
                                        global_step=event.step, epoch=event.epoch, reason=event.reason)
        msg.create_time.GetCurrentTime()
        self.publish(LIFECYCLE_TOPIC, msg, key=f"{event.layer}[{event.seed}]")

    def publish_epoch_metrics(self, epoch: int, global_step: int, values: dict[str, float]) -> None:
        event = common_pb2.MetricsEvent(run_id=self.run_id, epoch=epoch, global_step=global_step, scope="epoch",
                                        values=values)
        event.create_time.GetCurrentTime()
        self.publish(METRICS_TOPIC, event, key=self.run_id)

    def publish_decisions_now(self, decisions: list[common_pb2.AdaptationDecision]) -> None:
        """Queue the decisions that are not WAIT (worker thread)."""
        for d in decisions:
            if d.action != common_pb2.DECISION_ACTION_WAIT:
                self.publishes.append(self._request(DECISIONS_TOPIC, d, self.run_id))

    def report(self, report: common_pb2.FieldReport) -> None:
        """Queue an outcome report for Tamiyo (training thread)."""
        self.worker.call_soon(self.reports.append, report)

    # ---------------------------------------------------------------- worker thread

    async def drain_forever(self) -> None:
        """Send queued publishes and reports whenever their service is up."""
        while True:
            sent = await self._drain(self.publishes, self.oona,
                                     lambda c, item: c.publish_request(item, timeout=self.call_timeout_s))
            sent |= await self._drain(self.reports, self.tamiyo,
                                      lambda c, item: c.report_outcome(item, timeout=self.call_timeout_s))
            await asyncio.sleep(0 if sent else 0.02)

    async def _drain(self, backlog: deque, link: ServiceLink | None, send) -> bool:
        if link is None:
            backlog.clear()
            return False
        sent = False
        while backlog and link.may_call():
            try:
                await send(link.client(), backlog[0])
            except EsperError as exc:
                if is_outage(exc):
                    await link.failed(exc)
                    break
                log.warning("%s rejected a message: %s", link.name, exc)
            else:
                link.ok()
                sent = True
            backlog.popleft()
        return sent

    async def flush(self, timeout: float) -> None:
        """Wait (up to `timeout`) until the backlogs are sent or their services are down."""
        deadline = time.monotonic() + timeout
        pairs = [(self.publishes, self.oona), (self.reports, self.tamiyo)]
        while time.monotonic() < deadline and any(backlog and link is not None and link.up for backlog, link in pairs):
            await asyncio.sleep(0.05)


def outcome_of(event: Any, pending: Adaptation | None) -> int | None:
    """The outcome to report for a lifecycle `event` of a germination (`pending`, if one is known),
    or None: a cancellation after waiting out an outage is SERVICE_UNAVAILABLE (not counted
    against max_adaptations); cancellations by compile failures are reported where they happen."""
    outcome = OUTCOMES.get(S(event.to_state))
    if event.to_state == S.CANCELLED and not event.reason.startswith((COMPILE_FAILED_PREFIX, UNAVAILABLE_PREFIX)):
        waited_out_an_outage = pending is not None and (pending.outage_s > 0 or pending.outage_epochs)
        outcome = (common_pb2.ADAPTATION_OUTCOME_SERVICE_UNAVAILABLE if waited_out_an_outage
                   else common_pb2.ADAPTATION_OUTCOME_CANCELLED)
    return outcome


def field_report(run_id: str, adaptation: Adaptation, outcome: int, epoch: int, row: Any | None
                 ) -> common_pb2.FieldReport:
    """The `FieldReport` of one adaptation's outcome: the decision, the graph's view of the slot
    then (`adaptation`) and now (`row`, the slot's seed-table row, if there is one)."""
    report = common_pb2.FieldReport(run_id=run_id, decision=adaptation.decision, outcome=outcome, epoch=epoch)
    report.telemetry_before.CopyFrom(adaptation.telemetry_before)
    report.signals_before.CopyFrom(adaptation.signals_before)
    report.graph.CopyFrom(adaptation.graph_before)
    if row is not None:
        report.telemetry_after.CopyFrom(row.to_proto().telemetry)
        if row.last_contribution is not None:
            report.contribution = float(row.last_contribution)
    report.create_time.GetCurrentTime()
    return report
