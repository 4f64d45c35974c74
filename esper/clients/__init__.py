"""Typed clients of every Esper service, one layer above `esper.serving` and below the subsystems.

- `UrzaClient` (blocking) and `AsyncUrzaClient`: blueprints and kernel artifacts (downloads are
  SHA-256 verified);
- `TezzeretClient`: compile jobs (request, poll, watch);
- `TamiyoClient`: decisions and outcome reports;
- `OonaClient`: publish, subscribe, ack, topics; `KernelReadyPublisher` on top of it;
- `TolariaClient` (blocking): a training run's status, seed table, checkpoint and stop.

Every call carries a deadline and only idempotent calls are retried (`esper.serving.unary_call`);
failures come back as `esper.errors` exceptions (a server that did not answer is UnavailableError).
`ServiceLink` adds per-service backoff for long-lived processes (the trainer) that must keep going
while a service is down. Topic names and content types are in `esper.clients.topics`.
"""

from esper.clients.base import AioClient, SyncClient, address_of
from esper.clients.link import ServiceLink, is_outage
from esper.clients.oona import KernelReadyPublisher, OonaClient
from esper.clients.tamiyo import TamiyoClient
from esper.clients.tezzeret import TezzeretClient
from esper.clients.tolaria import TolariaClient
from esper.clients.urza import AsyncUrzaClient, UrzaClient

__all__ = [
    "AioClient",
    "AsyncUrzaClient",
    "KernelReadyPublisher",
    "OonaClient",
    "ServiceLink",
    "SyncClient",
    "TamiyoClient",
    "TezzeretClient",
    "TolariaClient",
    "UrzaClient",
    "address_of",
    "is_outage",
]
