"""`DecisionRequests`: the graph goes to Tamiyo on the worker thread; its decisions come back
through the outbox (`DecisionsArrived`) and are applied at the next step boundary. The graph a
request carried is kept: a germination's field report records what Tamiyo saw."""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable

from esper.clients import ServiceLink, TamiyoClient, is_outage
from esper.errors import EsperError
from esper.tolaria.adaptation.outbox import DecisionsArrived, Outbox
from esper.tolaria.adaptation.reporting import Reporter
from esper.tolaria.adaptation.worker import AdaptationWorker
from esper.v1 import common_pb2

log = logging.getLogger("esper.tolaria.adaptation")


class DecisionRequests:
    """One Decide call at a time, in the background (see the module docstring)."""

    def __init__(self, worker: AdaptationWorker, outbox: Outbox, reporter: Reporter, timeout_s: float,
                 note: Callable[[str], None]) -> None:
        self.worker = worker
        self.outbox = outbox
        self.reporter = reporter
        self.timeout_s = timeout_s
        self.note = note
        self.tamiyo: ServiceLink[TamiyoClient] | None = None
        # The call in flight (or the last one): a new graph is not sent before it returns.
        self.future: concurrent.futures.Future | None = None
        self.latencies_ms: list[float] = []
        # What the last graph sent showed: per (layer, seed) node, and the whole graph.
        self.last_nodes: dict[tuple[str, int], common_pb2.GraphNode] = {}
        self.last_graph = common_pb2.ModelGraphState()
        self.last_signals = common_pb2.TrainingSignals()

    def submit(self, state: common_pb2.ModelGraphState) -> None:
        """Sends a copy of `state` to Tamiyo unless the previous call is still out (noted)."""
        if not self.worker.running:
            return
        if self.future is not None and not self.future.done():
            self.note("decision skipped: the previous Decide call has not returned yet")
            return
        graph = common_pb2.ModelGraphState()
        graph.CopyFrom(state)
        self.future = self.worker.submit(self._decide(graph, time.perf_counter()))

    async def _decide(self, graph: common_pb2.ModelGraphState, submitted: float) -> None:
        link = self.tamiyo
        self.last_nodes = {(n.layer_name, n.seed.seed_index): n for n in graph.nodes}
        self.last_graph = graph
        self.last_signals = graph.signals
        if link is None or not link.may_call():
            return
        try:
            decisions = await link.client().decide(graph, timeout=self.timeout_s)
        except EsperError as exc:
            if is_outage(exc):
                await link.failed(exc)
            else:
                log.warning("Tamiyo rejected the graph: %s", exc)
            return
        link.ok()
        self.latencies_ms.append((time.perf_counter() - submitted) * 1000)
        self.reporter.publish_decisions_now(decisions)
        self.outbox.put(DecisionsArrived(decisions))
