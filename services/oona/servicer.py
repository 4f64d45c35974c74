"""Thin OonaService servicer: protobuf <-> `esper.oona` domain objects, nothing else.

Domain errors raised by the bus (`esper.errors`) reach the client through the shared
error-mapping interceptor; nothing here catches them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from esper.errors import InvalidArgumentError
from esper.oona import Message, OonaBus, OutgoingMessage, StartPosition
from esper.oona.bus import MAX_BATCH
from esper.serving.server import DEFAULT_MAX_MESSAGE_BYTES
from esper.v1 import oona_pb2, oona_pb2_grpc

SERVICE_NAME = "esper.v1.OonaService"

# SUBSCRIBE_START_UNSPECIFIED means LATEST, like a fresh subscriber on any log-based bus.
_START = {
    oona_pb2.SUBSCRIBE_START_UNSPECIFIED: StartPosition.LATEST,
    oona_pb2.SUBSCRIBE_START_LATEST: StartPosition.LATEST,
    oona_pb2.SUBSCRIBE_START_EARLIEST: StartPosition.EARLIEST,
    oona_pb2.SUBSCRIBE_START_OFFSET: StartPosition.OFFSET,
}


def envelope(message: Message) -> oona_pb2.Envelope:
    """The wire form of a delivered message."""
    publish_time = Timestamp()
    publish_time.FromNanoseconds(int(message.publish_time * 1e9))
    return oona_pb2.Envelope(message_id=message.message_id, topic=message.topic, offset=message.offset,
                             key=message.key, content_type=message.content_type, payload=message.payload,
                             headers=message.headers, publish_time=publish_time,
                             delivery_attempt=message.delivery_attempt, source=message.source)


def _fitting(batch: list[Message], max_count: int, max_bytes: int) -> list[list[oona_pb2.Envelope]]:
    """`batch` as envelopes in groups of at most `max_count` and `max_bytes` (never empty)."""
    groups: list[list[oona_pb2.Envelope]] = [[]]
    size = 0
    for message in batch:
        item = envelope(message)
        item_size = item.ByteSize() + 8  # tag and length prefix in the repeated field
        if groups[-1] and (len(groups[-1]) >= max_count or size + item_size > max_bytes):
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item_size
    return [g for g in groups if g]


class OonaServicer(oona_pb2_grpc.OonaServiceServicer):
    """Publish / Subscribe / Ack / ListTopics over an `OonaBus`."""

    def __init__(self, bus: OonaBus, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.bus = bus
        # A Subscribe response never grows past this: max_batch is a count, payloads are up to
        # ~4 MiB each, so a batch is also cut by bytes (a single message always fits on its own).
        self.max_response_bytes = max_message_bytes - 16 * 1024

    async def Publish(self, request: oona_pb2.PublishRequest, context: grpc.aio.ServicerContext
                      ) -> oona_pb2.PublishResponse:
        result = await self.bus.publish(request.topic, request.payload, key=request.key,
                                        content_type=request.content_type, headers=dict(request.headers),
                                        source=request.source, idempotency_key=request.idempotency_key)
        return oona_pb2.PublishResponse(message_id=result.message_id, offset=result.offset)

    async def PublishBatch(self, request: oona_pb2.PublishBatchRequest, context: grpc.aio.ServicerContext
                           ) -> oona_pb2.PublishBatchResponse:
        items = [(m.topic, OutgoingMessage(payload=m.payload, key=m.key, content_type=m.content_type,
                                           headers=dict(m.headers), source=m.source,
                                           idempotency_key=m.idempotency_key)) for m in request.messages]
        results = await self.bus.publish_batch(items)
        return oona_pb2.PublishBatchResponse(results=[
            oona_pb2.PublishResponse(message_id=r.message_id, offset=r.offset) for r in results])

    async def Subscribe(self, request: oona_pb2.SubscribeRequest, context: grpc.aio.ServicerContext
                        ) -> AsyncIterator[oona_pb2.SubscribeResponse]:
        if not 0 <= request.max_batch <= MAX_BATCH:
            raise InvalidArgumentError(f"max_batch must be in 0..{MAX_BATCH}, got {request.max_batch}",
                                       field="max_batch")
        start = _START.get(request.start)
        if start is None:
            raise InvalidArgumentError(f"start {request.start} is not a SubscribeStart value; expected "
                                       "SUBSCRIBE_START_LATEST, _EARLIEST or _OFFSET", field="start")
        if request.consumer_group:
            options = self.bus.group_options(request.consumer_group, request.consumer_name,
                                             request.visibility_timeout_seconds, request.max_in_flight)
            subscription = await self.bus.join_group(request.topic, options, start, request.from_offset)
        else:
            for name, value in (("consumer_name", request.consumer_name),
                                ("visibility_timeout_seconds", request.visibility_timeout_seconds),
                                ("max_in_flight", request.max_in_flight)):
                if value:
                    raise InvalidArgumentError(f"{name} is set but consumer_group is empty; it only applies "
                                               "to consumer-group subscriptions", field=name)
            subscription = await self.bus.subscribe(request.topic, start, request.from_offset)
        max_batch = request.max_batch
        async for batch in subscription.batches():
            if max_batch > 1:
                for group in _fitting(batch, max_batch, self.max_response_bytes):
                    yield oona_pb2.SubscribeResponse(batch=group)
            else:
                for message in batch:
                    yield oona_pb2.SubscribeResponse(message=envelope(message))

    async def Ack(self, request: oona_pb2.AckRequest, context: grpc.aio.ServicerContext) -> oona_pb2.AckResponse:
        acked = await self.bus.ack(request.topic, request.consumer_group, list(request.message_ids))
        return oona_pb2.AckResponse(acked=acked)

    async def ListTopics(self, request: oona_pb2.ListTopicsRequest, context: grpc.aio.ServicerContext
                         ) -> oona_pb2.ListTopicsResponse:
        topics = await self.bus.list_topics()
        return oona_pb2.ListTopicsResponse(topics=[
            oona_pb2.TopicInfo(name=t.name, first_offset=t.first_offset, next_offset=t.next_offset,
                               retained_messages=t.retained_messages, consumer_groups=list(t.consumer_groups))
            for t in topics])
