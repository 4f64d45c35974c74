"""In-memory Oona backend: the default; bounded retention per topic, state lost on restart."""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import time
from dataclasses import dataclass, field

from esper.errors import NotFoundError, ResourceExhaustedError, quoted
from esper.oona.backend import DEFAULT_RETENTION, OonaBackend
from esper.oona.model import Message, OutgoingMessage, PublishResult, TopicInfo

DEFAULT_RETENTION_BYTES = 256 * 2**20
MAX_TOPICS = 10_000


@dataclass
class _Pending:
    consumer: str
    deadline: float
    attempts: int


@dataclass
class _Group:
    cursor: int
    pending: dict[int, _Pending] = field(default_factory=dict)
    per_consumer: dict[str, int] = field(default_factory=dict)
    # (deadline, offset, attempts); stale entries are skipped when popped.
    expiry: list[tuple[float, int, int]] = field(default_factory=list)

    def assign(self, offset: int, consumer: str, deadline: float, attempts: int) -> None:
        previous = self.pending.get(offset)
        if previous is not None:
            self._release(previous.consumer)
        self.pending[offset] = _Pending(consumer, deadline, attempts)
        self.per_consumer[consumer] = self.per_consumer.get(consumer, 0) + 1
        heapq.heappush(self.expiry, (deadline, offset, attempts))

    def drop(self, offset: int) -> bool:
        entry = self.pending.pop(offset, None)
        if entry is None:
            return False
        self._release(entry.consumer)
        return True

    def _release(self, consumer: str) -> None:
        left = self.per_consumer[consumer] - 1
        if left:
            self.per_consumer[consumer] = left
        else:
            del self.per_consumer[consumer]


class _Topic:
    def __init__(self, name: str):
        self.name = name
        # messages[start:] are retained; the dead prefix is cut in bulk (amortised O(1) trims).
        self.messages: list[Message] = []
        self.start = 0
        self.base = 0  # offset of messages[0]
        self.next_offset = 0
        self.retained_bytes = 0
        self.groups: dict[str, _Group] = {}
        # idempotency key -> offset; entries whose offset retention dropped are ignored and pruned.
        self.idempotency: dict[str, int] = {}
        self._changed: asyncio.Future[None] | None = None

    @property
    def first_offset(self) -> int:
        return self.base + self.start

    @property
    def retained(self) -> int:
        return len(self.messages) - self.start

    def get(self, offset: int) -> Message | None:
        index = offset - self.base
        if index < self.start or index >= len(self.messages):
            return None
        return self.messages[index]

    def changed(self) -> asyncio.Future[None]:
        if self._changed is None or self._changed.done():
            self._changed = asyncio.get_running_loop().create_future()
        return self._changed

    def notify(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)


class InMemoryBackend(OonaBackend):
    """Topics as lists in this process; each keeps its newest `retention` messages (and at most
    `retention_bytes` of payload, but always the newest message)."""

    name = "memory"

    def __init__(self, retention: int = DEFAULT_RETENTION, retention_bytes: int = DEFAULT_RETENTION_BYTES):
        if retention <= 0 or retention_bytes <= 0:
            raise ValueError(f"retention ({retention}) and retention_bytes ({retention_bytes}) must be positive")
        self.retention = retention
        self.retention_bytes = retention_bytes
        self._topics: dict[str, _Topic] = {}

    def _topic(self, name: str, create: bool) -> _Topic | None:
        topic = self._topics.get(name)
        if topic is None and create:
            if len(self._topics) >= MAX_TOPICS:
                raise ResourceExhaustedError(f"the in-memory bus holds {MAX_TOPICS} topics already; cannot create "
                                             f"{quoted(name)}", metadata={"topic": name})
            topic = self._topics[name] = _Topic(name)
        return topic

    async def publish(self, topic: str, message: OutgoingMessage) -> PublishResult:
        t = self._topic(topic, create=True)
        assert t is not None
        key = message.idempotency_key
        if key:
            earlier = t.idempotency.get(key)
            if earlier is not None and earlier >= t.first_offset:
                return PublishResult(message_id=str(earlier), offset=earlier)
        offset = t.next_offset
        if key:
            t.idempotency[key] = offset
        t.messages.append(Message(topic=topic, offset=offset, payload=bytes(message.payload), key=message.key,
                                  content_type=message.content_type, headers=dict(message.headers),
                                  source=message.source, publish_time=time.time()))
        t.next_offset += 1
        t.retained_bytes += len(message.payload)
        self._trim(t)
        t.notify()
        return PublishResult(message_id=str(offset), offset=offset)

    def _trim(self, t: _Topic) -> None:
        while t.retained > self.retention or (t.retained_bytes > self.retention_bytes and t.retained > 1):
            t.retained_bytes -= len(t.messages[t.start].payload)
            t.start += 1
        if len(t.idempotency) > 2 * max(t.retained, 1024):
            first = t.first_offset
            t.idempotency = {k: o for k, o in t.idempotency.items() if o >= first}
        if t.start > 1024 and t.start * 2 > len(t.messages):
            del t.messages[:t.start]
            t.base += t.start
            t.start = 0

    async def bounds(self, topic: str) -> tuple[int, int]:
        t = self._topic(topic, create=False)
        return (0, 0) if t is None else (t.first_offset, t.next_offset)

    def _slice(self, t: _Topic, offset: int, max_count: int) -> list[Message]:
        index = max(offset - t.base, t.start)
        return t.messages[index:index + max_count]

    async def read(self, topic: str, offset: int, max_count: int, wait_seconds: float) -> list[Message]:
        t = self._topic(topic, create=False)
        if t is None:
            # Not listed until written; the waiter lives on a hidden topic object.
            t = self._topic(topic, create=True)
            assert t is not None
        batch = self._slice(t, offset, max_count)
        if not batch and wait_seconds > 0:
            await asyncio.wait({t.changed()}, timeout=wait_seconds)
            batch = self._slice(t, offset, max_count)
        return batch

    async def create_group(self, topic: str, group: str, start_offset: int) -> bool:
        t = self._topic(topic, create=True)
        assert t is not None
        if group in t.groups:
            return False
        t.groups[group] = _Group(cursor=start_offset)
        return True

    async def group_exists(self, topic: str, group: str) -> bool:
        t = self._topic(topic, create=False)
        return t is not None and group in t.groups

    def _group(self, topic: str, group: str) -> tuple[_Topic, _Group]:
        t = self._topic(topic, create=False)
        if t is None or group not in t.groups:
            raise NotFoundError(f"consumer group {quoted(group)} does not exist on topic {quoted(topic)}; subscribe with "
                                "consumer_group set to create it", metadata={"topic": topic, "group": group})
        return t, t.groups[group]

    def _claim_expired(self, t: _Topic, g: _Group, consumer: str, max_count: int, visibility_timeout: float,
                       own_only: bool) -> list[Message]:
        now = time.monotonic()
        out: list[Message] = []
        skipped: list[tuple[float, int, int]] = []
        while g.expiry and g.expiry[0][0] <= now and len(out) < max_count:
            deadline, offset, attempts = heapq.heappop(g.expiry)
            entry = g.pending.get(offset)
            if entry is None or entry.deadline != deadline or entry.attempts != attempts:
                continue  # acked or re-delivered since this heap entry was pushed
            message = t.get(offset)
            if message is None:  # trimmed by retention while pending: nothing left to deliver
                g.drop(offset)
                continue
            if own_only and entry.consumer != consumer:
                skipped.append((deadline, offset, attempts))
                continue
            g.assign(offset, consumer, now + visibility_timeout, attempts + 1)
            out.append(dataclasses.replace(message, delivery_attempt=attempts + 1))
        for item in skipped:
            heapq.heappush(g.expiry, item)
        return out

    def _take_new(self, t: _Topic, g: _Group, consumer: str, max_count: int, visibility_timeout: float) -> list[Message]:
        g.cursor = max(g.cursor, t.first_offset)  # skip what retention already dropped
        batch = self._slice(t, g.cursor, max_count)
        deadline = time.monotonic() + visibility_timeout
        for message in batch:
            g.assign(message.offset, consumer, deadline, 1)
        if batch:
            g.cursor = batch[-1].offset + 1
        return batch

    async def read_group(self, topic: str, group: str, consumer: str, max_count: int,
                         visibility_timeout: float, wait_seconds: float) -> list[Message]:
        t, g = self._group(topic, group)
        out = self._claim_expired(t, g, consumer, max_count, visibility_timeout, own_only=False)
        out += self._take_new(t, g, consumer, max_count - len(out), visibility_timeout)
        if out or wait_seconds <= 0:
            return out
        # Wake on a publish, or when the earliest pending entry expires, whichever comes first.
        timeout = wait_seconds
        if g.expiry:
            timeout = max(0.0, min(timeout, g.expiry[0][0] - time.monotonic()))
        await asyncio.wait({t.changed()}, timeout=timeout)
        t, g = self._group(topic, group)
        out = self._claim_expired(t, g, consumer, max_count, visibility_timeout, own_only=False)
        out += self._take_new(t, g, consumer, max_count - len(out), visibility_timeout)
        return out

    async def redeliver_own_expired(self, topic: str, group: str, consumer: str, max_count: int,
                                    visibility_timeout: float) -> list[Message]:
        t, g = self._group(topic, group)
        return self._claim_expired(t, g, consumer, max_count, visibility_timeout, own_only=True)

    async def pending_count(self, topic: str, group: str, consumer: str) -> int:
        _, g = self._group(topic, group)
        return g.per_consumer.get(consumer, 0)

    async def ack(self, topic: str, group: str, offsets: list[int]) -> int:
        _, g = self._group(topic, group)
        return sum(1 for offset in offsets if g.drop(offset))

    async def remove_consumer(self, topic: str, group: str, consumer: str) -> None:
        return None  # consumers exist only through their pending entries here

    async def list_topics(self) -> list[TopicInfo]:
        return [TopicInfo(name=t.name, first_offset=t.first_offset, next_offset=t.next_offset,
                          retained_messages=t.retained, consumer_groups=tuple(sorted(t.groups)),
                          group_lag={n: max(0, t.next_offset - g.cursor) for n, g in t.groups.items()},
                          group_pending={n: len(g.pending) for n, g in t.groups.items()})
                for name, t in sorted(self._topics.items()) if t.next_offset > 0 or t.groups]

