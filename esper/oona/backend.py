"""The storage interface every Oona backend implements, and backend selection by URL.

A backend stores per-topic append-only logs with dense offsets (0, 1, 2, ... in publish order),
trims each topic to a bounded retention, and keeps consumer-group state: a group cursor, and the
pending (delivered, unacked) entries with their owner, delivery count and last delivery time.
Everything above that (name/offset validation, subscription loops, max-in-flight, the
slow-subscriber policy) lives in `esper.oona.bus` so both backends behave the same.

Backends are asyncio objects used from one event loop (the server's).
"""

from __future__ import annotations

import abc
import urllib.parse

from esper.errors import InvalidArgumentError
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


def open_backend(url: str | None, *, retention: int = DEFAULT_RETENTION) -> OonaBackend:
    """Backend for a URL: ``memory://`` (default, also for None/empty) or ``redis://host:port/db``.

    Query parameters: ``retention=N`` (messages kept per topic) on both; ``namespace=NAME``
    (key prefix, default ``esper:oona``) on Redis; ``retention_bytes=N`` on memory.
    """
    from esper.oona.memory import InMemoryBackend

    url = url or "memory://"
    parsed = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parsed.query, keep_blank_values=True))
    if "retention" in query:
        retention = _positive_int(query.pop("retention"), "retention", url)
    if parsed.scheme == "memory":
        kwargs = {}
        if "retention_bytes" in query:
            kwargs["retention_bytes"] = _positive_int(query.pop("retention_bytes"), "retention_bytes", url)
        _reject_unknown(query, url)
        return InMemoryBackend(retention=retention, **kwargs)
    if parsed.scheme in ("redis", "rediss"):
        from esper.oona.redis_streams import DEFAULT_NAMESPACE, RedisStreamsBackend

        namespace = query.pop("namespace", DEFAULT_NAMESPACE)
        _reject_unknown(query, url)
        redis_url = urllib.parse.urlunsplit(parsed._replace(query=""))
        return RedisStreamsBackend(redis_url, retention=retention, namespace=namespace)
    raise InvalidArgumentError(f"Oona backend URL {url!r} has an unknown scheme {parsed.scheme!r}; expected "
                               "'memory://' or 'redis://host:port/db'", field="backend_url")


def _positive_int(text: str, name: str, url: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise InvalidArgumentError(f"{name}={text!r} in {url!r} must be a positive integer", field="backend_url")
    return value


def _reject_unknown(query: dict[str, str], url: str) -> None:
    if query:
        raise InvalidArgumentError(f"unknown option(s) {sorted(query)} in Oona backend URL {url!r}",
                                   field="backend_url")
