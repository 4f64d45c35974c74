"""`OonaBus`: validation and subscription semantics on top of any `OonaBackend`.

Slow-subscriber policy (the same on every backend)
--------------------------------------------------
Publishers never wait for subscribers: a publish appends to the topic's retained log and returns.

- Offset subscriptions are pull-based. Each subscriber has its own cursor and reads batches of at
  most `queue_limit` messages from the retained log, the next batch only after the previous one
  was handed on (over gRPC: written into the stream, so HTTP/2 flow control holds a slow client
  back). Per-subscriber buffering is therefore bounded by one batch. A subscriber that falls so
  far behind that retention dropped its next message gets RESOURCE_EXHAUSTED (reason
  ``SUBSCRIBER_LAGGED``, with the first missing and the earliest retained offset) instead of a
  silent gap; it may resubscribe from EARLIEST or from a later offset.
- Consumer-group subscriptions are bounded by ``max_in_flight``: a member holds at most that many
  delivered-but-unacked messages; at the limit it receives nothing new until it acks (or until its
  own unacked messages pass the visibility timeout and are delivered to it again). Messages a
  member leaves unacked for ``visibility_timeout`` seconds go to whichever member reads next,
  with ``delivery_attempt`` incremented: delivery is at least once, acks make it done.

Order: offsets are dense and increase in publish order per topic; offset subscribers see them in
order; group members see new messages in order, redeliveries interleaved where they happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from esper.errors import InvalidArgumentError, ResourceExhaustedError, quoted
from esper.oona.backend import OonaBackend
from esper.oona.model import (
    MAX_MEMBER_NAME_LENGTH,
    Message,
    OutgoingMessage,
    PublishResult,
    StartPosition,
    TopicInfo,
    parse_message_id,
    validate_idempotency_key,
    validate_name,
    validate_topic,
)

DEFAULT_QUEUE_LIMIT = 256
DEFAULT_MAX_IN_FLIGHT = 1000
MAX_MAX_IN_FLIGHT = 100_000
DEFAULT_VISIBILITY_TIMEOUT = 30.0
MIN_VISIBILITY_TIMEOUT = 0.05
MAX_VISIBILITY_TIMEOUT = 12 * 3600.0
# Leaves room under the 4 MiB gRPC message limit for the envelope around the payload.
DEFAULT_MAX_PAYLOAD_BYTES = 4 * 2**20 - 64 * 1024
MAX_HEADERS = 64
MAX_SHORT_FIELD = 1024
MAX_ACK_IDS = 10_000
MAX_BATCH = 10_000


@dataclass(frozen=True)
class GroupOptions:
    """A consumer-group membership: who, how long a delivery may stay unacked, how many at once."""

    group: str
    consumer: str
    visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT


class OonaBus:
    """The bus as the servicer (and in-process users) see it."""

    def __init__(self, backend: OonaBackend, *, queue_limit: int = DEFAULT_QUEUE_LIMIT,
                 poll_seconds: float = 1.0, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES):
        if queue_limit <= 0 or poll_seconds <= 0 or max_payload_bytes <= 0:
            raise ValueError("queue_limit, poll_seconds and max_payload_bytes must be positive")
        self.backend = backend
        self.queue_limit = queue_limit
        self.poll_seconds = poll_seconds
        self.max_payload_bytes = max_payload_bytes

    async def publish(self, topic: str, payload: bytes, *, key: str = "", content_type: str = "",
                      headers: Mapping[str, str] | None = None, source: str = "",
                      idempotency_key: str = "") -> PublishResult:
        """Append a message to `topic` (created on first publish). With an `idempotency_key` seen
        on this topic while its message is retained, returns that message's id and offset."""
        message = self._checked(topic, payload, key=key, content_type=content_type, headers=headers, source=source,
                                idempotency_key=idempotency_key)
        return await self.backend.publish(topic, message)

    async def publish_batch(self, items: list[tuple[str, OutgoingMessage]]) -> list[PublishResult]:
        """Append several (topic, message) pairs in order. All are validated first: one bad message
        raises InvalidArgumentError naming ``messages[i].<field>`` and nothing is published."""
        if not items:
            raise InvalidArgumentError("messages is empty; expected at least one message", field="messages")
        if len(items) > MAX_BATCH:
            raise InvalidArgumentError(f"{len(items)} messages in one batch; at most {MAX_BATCH}", field="messages")
        checked = []
        for i, (topic, m) in enumerate(items):
            try:
                checked.append((topic, self._checked(topic, m.payload, key=m.key, content_type=m.content_type,
                                                     headers=m.headers, source=m.source,
                                                     idempotency_key=m.idempotency_key)))
            except InvalidArgumentError as exc:
                raise InvalidArgumentError(f"messages[{i}]: {exc.message}", field=f"messages[{i}].{exc.field}",
                                           reason=exc.reason) from exc
        return await self.backend.publish_many(checked)

    def _checked(self, topic: str, payload: bytes, *, key: str, content_type: str,
                 headers: Mapping[str, str] | None, source: str, idempotency_key: str = "") -> OutgoingMessage:
        validate_topic(topic)
        validate_idempotency_key(idempotency_key)
        if len(payload) > self.max_payload_bytes:
            raise InvalidArgumentError(f"payload is {len(payload)} bytes; a message holds at most "
                                       f"{self.max_payload_bytes} bytes", field="payload")
        for name, value in (("key", key), ("content_type", content_type), ("source", source)):
            if len(value) > MAX_SHORT_FIELD:
                raise InvalidArgumentError(f"{name} is {len(value)} characters; at most {MAX_SHORT_FIELD}",
                                           field=name)
        headers = dict(headers or {})
        if len(headers) > MAX_HEADERS:
            raise InvalidArgumentError(f"{len(headers)} headers given; at most {MAX_HEADERS}", field="headers")
        for name, value in headers.items():
            if not name or len(name) > MAX_SHORT_FIELD or len(value) > MAX_SHORT_FIELD:
                raise InvalidArgumentError(f"header {quoted(name)} needs a non-empty name and name/value of at most "
                                           f"{MAX_SHORT_FIELD} characters", field="headers")
        return OutgoingMessage(payload=payload, key=key, content_type=content_type, headers=headers, source=source,
                               idempotency_key=idempotency_key)

    async def resolve_start(self, topic: str, start: StartPosition, from_offset: int) -> int:
        """The first offset a subscription starting at `start` reads; validates `from_offset`."""
        if start != StartPosition.OFFSET and from_offset != 0:
            raise InvalidArgumentError(f"from_offset={from_offset} is only used with start OFFSET; got start "
                                       f"{start.name}", field="from_offset")
        first, next_offset = await self.backend.bounds(topic)
        if start == StartPosition.LATEST:
            return next_offset
        if start == StartPosition.EARLIEST:
            return first
        if from_offset < 0:
            raise InvalidArgumentError(f"from_offset must be >= 0, got {from_offset}", field="from_offset")
        if from_offset > next_offset:
            raise InvalidArgumentError(f"from_offset {from_offset} is past the end of topic {quoted(topic)}; expected "
                                       f"{first}..{next_offset}", field="from_offset")
        if from_offset < first:
            raise InvalidArgumentError(f"from_offset {from_offset} is no longer retained on topic {quoted(topic)}; the "
                                       f"earliest retained offset is {first}", field="from_offset")
        return from_offset

    async def subscribe(self, topic: str, start: StartPosition = StartPosition.LATEST,
                        from_offset: int = 0) -> OffsetSubscription:
        """An offset subscription; errors in the request are raised here, before any message."""
        validate_topic(topic)
        next_offset = await self.resolve_start(topic, start, from_offset)
        return OffsetSubscription(self, topic, next_offset, tolerate_first_gap=start == StartPosition.EARLIEST)

    def group_options(self, group: str, consumer: str = "", visibility_timeout: float = 0.0,
                      max_in_flight: int = 0) -> GroupOptions:
        """Validated membership options; 0 / empty mean the defaults (a generated consumer name)."""
        validate_name(group, "consumer group", "consumer_group", MAX_MEMBER_NAME_LENGTH)
        if consumer:
            validate_name(consumer, "consumer", "consumer_name", MAX_MEMBER_NAME_LENGTH)
        else:
            consumer = f"consumer-{uuid.uuid4().hex[:12]}"
        if visibility_timeout == 0:
            visibility_timeout = DEFAULT_VISIBILITY_TIMEOUT
        if not math.isfinite(visibility_timeout) or not (
                MIN_VISIBILITY_TIMEOUT <= visibility_timeout <= MAX_VISIBILITY_TIMEOUT):
            raise InvalidArgumentError(
                f"visibility_timeout_seconds must be in [{MIN_VISIBILITY_TIMEOUT}, {MAX_VISIBILITY_TIMEOUT}] "
                f"(0 for the default {DEFAULT_VISIBILITY_TIMEOUT}), got {visibility_timeout}",
                field="visibility_timeout_seconds")
        if max_in_flight == 0:
            max_in_flight = DEFAULT_MAX_IN_FLIGHT
        if not 1 <= max_in_flight <= MAX_MAX_IN_FLIGHT:
            raise InvalidArgumentError(f"max_in_flight must be in [1, {MAX_MAX_IN_FLIGHT}] (0 for the default "
                                       f"{DEFAULT_MAX_IN_FLIGHT}), got {max_in_flight}", field="max_in_flight")
        return GroupOptions(group=group, consumer=consumer, visibility_timeout=float(visibility_timeout),
                            max_in_flight=max_in_flight)

    async def join_group(self, topic: str, options: GroupOptions, start: StartPosition = StartPosition.LATEST,
                         from_offset: int = 0) -> GroupSubscription:
        """Join (creating if needed) a consumer group; `start` applies only when the group is new."""
        validate_topic(topic)
        start_offset = await self.resolve_start(topic, start, from_offset)
        await self.backend.create_group(topic, options.group, start_offset)
        return GroupSubscription(self, topic, options)

    async def ack(self, topic: str, group: str, message_ids: list[str]) -> int:
        """Acknowledge deliveries; returns how many were still pending (repeats count 0)."""
        validate_topic(topic)
        validate_name(group, "consumer group", "consumer_group", MAX_MEMBER_NAME_LENGTH)
        if not message_ids:
            raise InvalidArgumentError("message_ids is empty; expected the ids of delivered messages",
                                       field="message_ids")
        if len(message_ids) > MAX_ACK_IDS:
            raise InvalidArgumentError(f"{len(message_ids)} message_ids in one ack; at most {MAX_ACK_IDS}",
                                       field="message_ids")
        offsets = [parse_message_id(mid, f"message_ids[{i}]") for i, mid in enumerate(message_ids)]
        return await self.backend.ack(topic, group, offsets)

    async def list_topics(self) -> list[TopicInfo]:
        """Every topic with its retained window and consumer groups."""
        return await self.backend.list_topics()

    async def close(self) -> None:
        await self.backend.close()


class OffsetSubscription:
    """Reads a topic from an offset in order; iterate `batches()` (or `messages()`) until cancelled."""

    def __init__(self, bus: OonaBus, topic: str, next_offset: int, tolerate_first_gap: bool = False):
        self.bus = bus
        self.topic = topic
        self.next_offset = next_offset
        self._tolerate_gap = tolerate_first_gap

    async def batches(self) -> AsyncIterator[list[Message]]:
        backend = self.bus.backend
        while True:
            _raise_if_cancelling()
            batch = await backend.read(self.topic, self.next_offset, self.bus.queue_limit, self.bus.poll_seconds)
            if not batch:
                continue
            if batch[0].offset > self.next_offset and not self._tolerate_gap:
                first, _ = await backend.bounds(self.topic)
                raise ResourceExhaustedError(
                    f"subscriber on topic {quoted(self.topic)} fell behind retention: offset {self.next_offset} was "
                    f"dropped before it was read (earliest retained: {first}); resubscribe from EARLIEST or a "
                    "retained offset, or read faster", reason="SUBSCRIBER_LAGGED",
                    metadata={"topic": self.topic, "next_offset": self.next_offset, "first_offset": first})
            # EARLIEST may race a trim between resolving the start and the first read.
            self._tolerate_gap = False
            self.next_offset = batch[-1].offset + 1
            yield batch

    async def messages(self) -> AsyncIterator[Message]:
        async for batch in self.batches():
            for message in batch:
                yield message


class GroupSubscription:
    """One consumer-group member's stream of deliveries, limited by max_in_flight."""

    def __init__(self, bus: OonaBus, topic: str, options: GroupOptions):
        self.bus = bus
        self.topic = topic
        self.options = options

    async def batches(self) -> AsyncIterator[list[Message]]:
        backend, o = self.bus.backend, self.options
        idle_sleep = 0.002
        try:
            while True:
                _raise_if_cancelling()
                room = o.max_in_flight - await backend.pending_count(self.topic, o.group, o.consumer)
                if room > 0:
                    batch = await backend.read_group(self.topic, o.group, o.consumer,
                                                     min(room, self.bus.queue_limit), o.visibility_timeout,
                                                     self.bus.poll_seconds)
                else:
                    batch = await backend.redeliver_own_expired(self.topic, o.group, o.consumer,
                                                                self.bus.queue_limit, o.visibility_timeout)
                    if not batch:
                        # At the limit: wait for acks, polling with a short capped backoff.
                        await asyncio.sleep(idle_sleep)
                        idle_sleep = min(idle_sleep * 2, 0.05)
                        continue
                idle_sleep = 0.002
                if batch:
                    yield batch
        finally:
            await asyncio.shield(_forget(backend, self.topic, o.group, o.consumer))

    async def messages(self) -> AsyncIterator[Message]:
        async for batch in self.batches():
            for message in batch:
                yield message


def _raise_if_cancelling() -> None:
    """Re-raise a cancellation a backend call swallowed.

    redis-py can turn a cancel that lands as a blocking read times out into a plain "no data"
    result; the task is then still marked as cancelling but our loop would go on reading forever
    after the client left. Checking at each turn ends the subscription as it should.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _forget(backend: OonaBackend, topic: str, group: str, consumer: str) -> None:
    # Best effort on the way out; never mask the reason the stream ended.
    with contextlib.suppress(Exception):
        await backend.remove_consumer(topic, group, consumer)
