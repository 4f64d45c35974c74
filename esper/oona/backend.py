"""The storage interface every Oona backend implements (selection by URL: `esper.oona.backend_url`).

A backend stores per-topic append-only logs with dense offsets (0, 1, 2, ... in publish order),
trims each topic to a bounded retention, and keeps consumer-group state: a group cursor, and the
pending (delivered, unacked) entries with their owner, delivery count and last delivery time.
Everything above that (name/offset validation, subscription loops, max-in-flight, the
slow-subscriber policy) lives in `esper.oona.bus` so both backends behave the same.

Backends are asyncio objects used from one event loop (the server's).
"""

from __future__ import annotations

import abc

from esper.oona.model import Message, OutgoingMessage, PublishResult, TopicInfo

DEFAULT_RETENTION = 100_000


class OonaBackend(abc.ABC):
    """Storage for topics and consumer groups. Names and offsets arrive already validated."""

    #: Short name for logs and benchmark tables, e.g. "memory" or "redis".
    name: str = "backend"

    @abc.abstractmethod
    async def publish(self, topic: str, message: OutgoingMessage) -> PublishResult:
        """Append one message; returns its id and offset (next_offset before the call)."""

    async def publish_many(self, items: list[tuple[str, OutgoingMessage]]) -> list[PublishResult]:
        """Append several (topic, message) pairs in order; backends may do it in one round trip."""
        return [await self.publish(topic, message) for topic, message in items]

    @abc.abstractmethod
    async def bounds(self, topic: str) -> tuple[int, int]:
        """(first retained offset, next offset); (0, 0) for a topic never written."""

    @abc.abstractmethod
    async def read(self, topic: str, offset: int, max_count: int, wait_seconds: float) -> list[Message]:
        """Up to `max_count` retained messages with offset >= `offset`, in offset order.

        Waits up to `wait_seconds` for the first one when none is available yet. Messages
        trimmed by retention are simply absent: the caller detects the gap from the offsets.
        """

    @abc.abstractmethod
    async def create_group(self, topic: str, group: str, start_offset: int) -> bool:
        """Create `group` on `topic` reading from `start_offset`; an existing group keeps its
        position. Returns True when the group was created. Creates the topic if needed."""

    @abc.abstractmethod
    async def group_exists(self, topic: str, group: str) -> bool:
        """Whether `group` exists on `topic`."""

    @abc.abstractmethod
    async def read_group(self, topic: str, group: str, consumer: str, max_count: int,
                         visibility_timeout: float, wait_seconds: float) -> list[Message]:
        """Deliver up to `max_count` messages to `consumer`.

        First, pending messages of any member that went unacked for `visibility_timeout`
        seconds are claimed for `consumer` (delivery_attempt incremented); then new messages
        after the group cursor (delivery_attempt 1). Waits up to `wait_seconds` when there is
        nothing to deliver. Every returned message is pending for `consumer` until acked.
        """

    @abc.abstractmethod
    async def redeliver_own_expired(self, topic: str, group: str, consumer: str, max_count: int,
                                    visibility_timeout: float) -> list[Message]:
        """`consumer`'s own pending messages unacked for `visibility_timeout`, delivered again.

        Used when the consumer is at its max-in-flight limit: this keeps its pending count the
        same, so a consumer that lost messages is not stuck waiting for acks that never come.
        """

    @abc.abstractmethod
    async def pending_count(self, topic: str, group: str, consumer: str) -> int:
        """Messages delivered to `consumer` and not yet acked."""

    @abc.abstractmethod
    async def ack(self, topic: str, group: str, offsets: list[int]) -> int:
        """Acknowledge pending messages; returns how many were pending (others are ignored).

        Raises NotFoundError when the topic or the group does not exist.
        """

    @abc.abstractmethod
    async def remove_consumer(self, topic: str, group: str, consumer: str) -> None:
        """Forget a consumer that has nothing pending (best effort, on unsubscribe)."""

    @abc.abstractmethod
    async def list_topics(self) -> list[TopicInfo]:
        """Every topic that was published to or has a consumer group, sorted by name."""

    async def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release connections."""
