"""`ServiceLink`: one service as seen by a long-lived process that must keep going while the
service is down (the trainer): its typed client, whether it is up, and the backoff before the
next attempt.

A call that fails with an outage (`is_outage`: the server did not answer, or shed load) marks the
service down (a warning) and closes the client; until the backoff expires no call is made (a dead
service costs nothing); then a fresh channel is tried, and the first answer marks it up again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from esper.errors import ResourceExhaustedError, UnavailableError
from esper.serving.client import ChannelConfig

log = logging.getLogger("esper.clients.link")

C = TypeVar("C")
T = TypeVar("T")


def is_outage(exc: BaseException) -> bool:
    """A failure that means "back off and try again later", not an answer."""
    return isinstance(exc, UnavailableError | ResourceExhaustedError)


class ServiceLink(Generic[C]):
    """One service: its client (opened lazily, replaced after an outage), up/down, backoff."""

    def __init__(self, name: str, config: ChannelConfig, make_client: Callable[[ChannelConfig], C], *,
                 retry_initial_s: float, retry_max_s: float, on_change: Callable[[], None] = lambda: None):
        self.name = name
        self.config = config
        self.address = config.address
        self._make_client = make_client
        self._client: C | None = None
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.down_reason = ""
        self.next_try = 0.0
        self.backoff = retry_initial_s
        self.failures = 0
        self.outages = 0
        self._on_change = on_change

    def client(self) -> C:
        """The service's client (a fresh channel after an outage)."""
        if self._client is None:
            self._client = self._make_client(self.config)
        return self._client

    @property
    def up(self) -> bool:
        return not self.down_reason

    def may_call(self) -> bool:
        """Up, or its backoff has expired (time for a fresh attempt)."""
        return self.up or time.monotonic() >= self.next_try

    async def wait_turn(self) -> None:
        """Sleep out the backoff of a service that is down."""
        wait = self.next_try - time.monotonic()
        if not self.up and wait > 0:
            await asyncio.sleep(wait)

    async def failed(self, err: BaseException) -> None:
        """Mark the service down (warn on the first failure) and back off before the next attempt."""
        # Client errors name the service and address already ("Urza at HOST:PORT did not answer ...").
        reason = str(err) if self.address in str(err) else f"{self.name} at {self.address} unreachable: {err}"
        self.failures += 1
        if self.up:
            self.outages += 1
            self.backoff = self.retry_initial_s
            log.warning("%s; training continues without adaptation, retrying with backoff", reason)
        else:
            self.backoff = min(self.retry_max_s, self.backoff * 2)
        self.down_reason = reason
        self.next_try = time.monotonic() + self.backoff
        # A fresh channel at the next attempt connects at once (a failed channel's own reconnect
        # backoff grows to minutes).
        await self.close()
        self._on_change()

    def ok(self) -> None:
        """The service answered."""
        if not self.up:
            log.warning("%s at %s is back; adaptation resumes", self.name, self.address)
            self.down_reason = ""
            self._on_change()
        self.backoff = self.retry_initial_s

    async def call(self, fn: Callable[[C], Awaitable[T]]) -> T:
        """`fn(client)`, waiting out the backoff and trying again after each outage; an answer
        that is an error (NotFoundError, InvalidArgumentError, ...) is raised."""
        while True:
            await self.wait_turn()
            try:
                reply = await fn(self.client())
            except Exception as exc:
                if not is_outage(exc):
                    self.ok()
                    raise
                await self.failed(exc)
                continue
            self.ok()
            return reply

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()
