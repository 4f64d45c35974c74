"""Redis Streams Oona backend (`redis://host:port/db`), through redis-py's asyncio client.

Layout under a namespace (default ``esper:oona``):

- ``{ns}:stream:{topic}``: the topic's stream. Entry ids are ``1-<offset>`` so offsets stay dense
  integers (0, 1, 2, ...) exactly like the in-memory backend; a Lua script takes the next offset
  from ``{ns}:seq:{topic}`` (INCR) and XADDs with that id and ``MAXLEN ~ retention`` atomically,
  so concurrent publishers (even on several Oona servers) never collide.
- ``{ns}:topics``: the set of topic names, for ListTopics.
- ``{ns}:idem:{topic}`` (hash idempotency key -> offset) and ``{ns}:idemz:{topic}`` (the same keys
  scored by offset): the publish script answers a repeated key with the first offset while that
  entry is still in the stream, and drops keys whose entries retention trimmed.
- Consumer groups are native stream groups: XREADGROUP for new messages, XAUTOCLAIM to take over
  messages another member left unacked past the visibility timeout, XACK to acknowledge.

Retention is approximate (``MAXLEN ~``): Redis trims whole stream nodes (100 entries by default),
so a topic may hold up to about one node more than `retention`.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from esper.errors import NotFoundError, UnavailableError, quoted
from esper.oona.backend import DEFAULT_RETENTION, OonaBackend
from esper.oona.model import Message, OutgoingMessage, PublishResult, TopicInfo

DEFAULT_NAMESPACE = "esper:oona"

_PUBLISH_LUA = """
local key = ARGV[9]
if key ~= '' then
  local earlier = redis.call('HGET', KEYS[4], key)
  if earlier and #redis.call('XRANGE', KEYS[1], '1-' .. earlier, '1-' .. earlier) > 0 then
    return tonumber(earlier)
  end
end
local n = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '1-' .. (n - 1),
           'k', ARGV[2], 'c', ARGV[3], 'p', ARGV[4], 'h', ARGV[5], 't', ARGV[6], 's', ARGV[7])
if n == 1 then redis.call('SADD', KEYS[3], ARGV[8]) end
if key ~= '' then
  redis.call('HSET', KEYS[4], key, n - 1)
  redis.call('ZADD', KEYS[5], n - 1, key)
  -- forget keys whose messages retention already dropped
  local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
  if #first > 0 then
    local first_offset = tonumber(string.match(first[1][1], '%-(%d+)$'))
    local stale = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', '(' .. first_offset, 'LIMIT', 0, 100)
    if #stale > 0 then
      redis.call('HDEL', KEYS[4], unpack(stale))
      redis.call('ZREM', KEYS[5], unpack(stale))
    end
  end
end
return n - 1
"""


P = ParamSpec("P")
T = TypeVar("T")


def _unavailable_on_connection_errors(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Redis down or unreachable -> UnavailableError (UNAVAILABLE, retryable) instead of INTERNAL."""
    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError, ConnectionError) as exc:
            backend = args[0]
            raise UnavailableError(f"Redis at {getattr(backend, 'url', '?')} is unavailable: {exc}",
                                   reason="BACKEND_UNAVAILABLE") from exc
    return wrapper


def _entry_id(offset: int) -> str:
    return f"1-{offset}"


def _after_id(offset: int) -> str:
    """The exclusive id XREAD/XGROUP need to start at `offset`."""
    return _entry_id(offset - 1) if offset > 0 else "0-0"


def _offset_of(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.partition("-")[2])


def _decode(topic: str, entry_id: bytes, fields: dict[bytes, bytes], attempt: int = 1) -> Message:
    headers = fields.get(b"h", b"")
    return Message(topic=topic, offset=_offset_of(entry_id), payload=fields.get(b"p", b""),
                   key=fields.get(b"k", b"").decode(), content_type=fields.get(b"c", b"").decode(),
                   headers=json.loads(headers) if headers else {}, source=fields.get(b"s", b"").decode(),
                   publish_time=float(fields.get(b"t", b"0")), delivery_attempt=attempt)


class RedisStreamsBackend(OonaBackend):
    """Topics as Redis streams; see the module docstring for the key layout."""

    name = "redis"

    def __init__(self, url: str, retention: int = DEFAULT_RETENTION, namespace: str = DEFAULT_NAMESPACE):
        if retention <= 0:
            raise ValueError(f"retention must be positive, got {retention}")
        self.url = url
        self.retention = retention
        self.namespace = namespace
        self._redis = aioredis.Redis.from_url(url, decode_responses=False)
        self._publish_script = self._redis.register_script(_PUBLISH_LUA)
        # XAUTOCLAIM scan position per (topic, group), so repeated claims walk the whole PEL.
        self._claim_cursor: dict[tuple[str, str], str] = {}

    def _stream(self, topic: str) -> str:
        return f"{self.namespace}:stream:{topic}"

    def _seq(self, topic: str) -> str:
        return f"{self.namespace}:seq:{topic}"

    def _publish_keys(self, topic: str) -> list[str]:
        # The idempotency hash (key -> offset) and its index by offset, for pruning.
        return [self._stream(topic), self._seq(topic), self._topics_key, f"{self.namespace}:idem:{topic}",
                f"{self.namespace}:idemz:{topic}"]

    @property
    def _topics_key(self) -> str:
        return f"{self.namespace}:topics"

    async def ping(self) -> None:
        """Raise UnavailableError when Redis cannot be reached."""
        try:
            await self._redis.ping()
        except (OSError, aioredis.ConnectionError) as exc:
            raise UnavailableError(f"cannot reach Redis at {self.url}: {exc}") from exc

    @_unavailable_on_connection_errors
    async def publish(self, topic: str, message: OutgoingMessage) -> PublishResult:
        offset = int(await self._publish_script(keys=self._publish_keys(topic), args=self._publish_args(topic, message)))
        return PublishResult(message_id=str(offset), offset=offset)

    def _publish_args(self, topic: str, message: OutgoingMessage) -> list:
        headers = json.dumps(dict(message.headers), separators=(",", ":")) if message.headers else ""
        return [self.retention, message.key, message.content_type, bytes(message.payload), headers,
                repr(time.time()), message.source, topic, message.idempotency_key]

    @_unavailable_on_connection_errors
    async def publish_many(self, items: list[tuple[str, OutgoingMessage]]) -> list[PublishResult]:
        # One pipelined round trip; the scripts still run one after another, in order.
        async with self._redis.pipeline(transaction=False) as pipe:
            for topic, message in items:
                await self._publish_script(keys=self._publish_keys(topic), args=self._publish_args(topic, message),
                                           client=pipe)
            offsets = await pipe.execute()
        return [PublishResult(message_id=str(int(o)), offset=int(o)) for o in offsets]

    @_unavailable_on_connection_errors
    async def bounds(self, topic: str) -> tuple[int, int]:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(self._seq(topic))
            pipe.xrange(self._stream(topic), "-", "+", count=1)
            seq, first = await pipe.execute()
        next_offset = int(seq or 0)
        first_offset = _offset_of(first[0][0]) if first else next_offset
        return first_offset, next_offset

    @_unavailable_on_connection_errors
    async def read(self, topic: str, offset: int, max_count: int, wait_seconds: float) -> list[Message]:
        block = int(wait_seconds * 1000)
        reply = await self._redis.xread({self._stream(topic): _after_id(offset)}, count=max_count,
                                        block=block if block > 0 else None)
        if not reply:
            return []
        return [_decode(topic, entry_id, fields) for entry_id, fields in reply[0][1]]

    @_unavailable_on_connection_errors
    async def create_group(self, topic: str, group: str, start_offset: int) -> bool:
        try:
            await self._redis.xgroup_create(self._stream(topic), group, id=_after_id(start_offset), mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" in str(exc):
                return False
            raise
        await self._redis.sadd(self._topics_key, topic)
        return True

    async def _group_names(self, topic: str) -> list[str]:
        try:
            groups = await self._redis.xinfo_groups(self._stream(topic))
        except ResponseError:  # no such key
            return []
        return [g["name"].decode() if isinstance(g["name"], bytes) else g["name"] for g in groups]

    @_unavailable_on_connection_errors
    async def group_exists(self, topic: str, group: str) -> bool:
        return group in await self._group_names(topic)

    def _not_found(self, topic: str, group: str) -> NotFoundError:
        return NotFoundError(f"consumer group {quoted(group)} does not exist on topic {quoted(topic)}; subscribe with "
                             "consumer_group set to create it", metadata={"topic": topic, "group": group})

    async def _claim_others_expired(self, topic: str, group: str, consumer: str, max_count: int,
                                    visibility_timeout: float) -> list[Message]:
        stream = self._stream(topic)
        cursor = self._claim_cursor.get((topic, group), "0-0")
        reply = await self._redis.xautoclaim(stream, group, consumer, int(visibility_timeout * 1000),
                                             start_id=cursor, count=max_count)
        next_cursor, claimed = reply[0], reply[1]
        self._claim_cursor[(topic, group)] = next_cursor.decode() if isinstance(next_cursor, bytes) else next_cursor
        claimed = [(entry_id, fields) for entry_id, fields in claimed if fields]
        if not claimed:
            return []
        # XAUTOCLAIM already counted this delivery; read the counts back (rare path: redeliveries).
        async with self._redis.pipeline(transaction=False) as pipe:
            for entry_id, _ in claimed:
                pipe.xpending_range(stream, group, min=entry_id, max=entry_id, count=1)
            infos = await pipe.execute()
        return [_decode(topic, entry_id, fields, attempt=int(info[0]["times_delivered"]) if info else 2)
                for (entry_id, fields), info in zip(claimed, infos, strict=True)]

    @_unavailable_on_connection_errors
    async def read_group(self, topic: str, group: str, consumer: str, max_count: int,
                         visibility_timeout: float, wait_seconds: float) -> list[Message]:
        try:
            out = await self._claim_others_expired(topic, group, consumer, max_count, visibility_timeout)
            if len(out) >= max_count:
                return out
            # Block at most a quarter of the visibility timeout so other members' expired
            # messages are picked up promptly even when nothing new arrives.
            block = int(min(wait_seconds, max(0.05, visibility_timeout / 4)) * 1000)
            reply = await self._redis.xreadgroup(group, consumer, {self._stream(topic): ">"},
                                                 count=max_count - len(out),
                                                 block=None if out or block <= 0 else block)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                raise self._not_found(topic, group) from exc
            raise
        if reply:
            out += [_decode(topic, entry_id, fields) for entry_id, fields in reply[0][1] if fields]
        return out

    @_unavailable_on_connection_errors
    async def redeliver_own_expired(self, topic: str, group: str, consumer: str, max_count: int,
                                    visibility_timeout: float) -> list[Message]:
        stream = self._stream(topic)
        idle_ms = int(visibility_timeout * 1000)
        try:
            expired = await self._redis.xpending_range(stream, group, min="-", max="+", count=max_count,
                                                       consumername=consumer, idle=idle_ms)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                raise self._not_found(topic, group) from exc
            raise
        if not expired:
            return []
        attempts = {info["message_id"]: int(info["times_delivered"]) + 1 for info in expired}
        claimed = await self._redis.xclaim(stream, group, consumer, idle_ms, list(attempts))
        return [_decode(topic, entry_id, fields, attempt=attempts.get(entry_id, 2))
                for entry_id, fields in claimed if fields]

    @_unavailable_on_connection_errors
    async def pending_count(self, topic: str, group: str, consumer: str) -> int:
        try:
            summary = await self._redis.xpending(self._stream(topic), group)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                raise self._not_found(topic, group) from exc
            raise
        for entry in summary.get("consumers") or ():
            name = entry["name"].decode() if isinstance(entry["name"], bytes) else entry["name"]
            if name == consumer:
                return int(entry["pending"])
        return 0

    @_unavailable_on_connection_errors
    async def ack(self, topic: str, group: str, offsets: list[int]) -> int:
        acked = 0
        if offsets:
            try:
                acked = int(await self._redis.xack(self._stream(topic), group, *map(_entry_id, offsets)))
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
        if (acked < len(offsets) or not offsets) and not await self.group_exists(topic, group):
            raise self._not_found(topic, group)
        return acked

    async def remove_consumer(self, topic: str, group: str, consumer: str) -> None:
        try:
            if await self.pending_count(topic, group, consumer) == 0:
                await self._redis.xgroup_delconsumer(self._stream(topic), group, consumer)
        except (NotFoundError, ResponseError):
            pass  # the group went away: nothing to forget

    @_unavailable_on_connection_errors
    async def list_topics(self) -> list[TopicInfo]:
        names = sorted(n.decode() for n in await self._redis.smembers(self._topics_key))
        if not names:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.get(self._seq(name))
                pipe.xrange(self._stream(name), "-", "+", count=1)
                pipe.xlen(self._stream(name))
                pipe.xinfo_groups(self._stream(name))
            replies = await pipe.execute(raise_on_error=False)
        topics = []
        for i, name in enumerate(names):
            seq, first, length, groups = replies[4 * i:4 * i + 4]
            next_offset = int(seq or 0)
            groups = [] if isinstance(groups, Exception) else groups
            lag, pending = {}, {}
            for g in groups:
                group = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
                last = g["last-delivered-id"]
                last = last.decode() if isinstance(last, bytes) else str(last)
                # "0-0": nothing delivered yet; else "1-<offset>" of the last entry delivered.
                cursor = 0 if last.startswith("0-") else _offset_of(last) + 1
                lag[group] = max(0, next_offset - cursor)
                pending[group] = int(g["pending"])
            topics.append(TopicInfo(name=name, first_offset=_offset_of(first[0][0]) if first else next_offset,
                                    next_offset=next_offset, retained_messages=int(length),
                                    consumer_groups=tuple(sorted(lag)), group_lag=lag, group_pending=pending))
        return topics

    async def close(self) -> None:
        await self._redis.aclose()
