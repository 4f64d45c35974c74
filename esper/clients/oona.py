"""`OonaClient`: an asyncio client of the Oona message bus for other Esper processes.

Only idempotent calls (Ack, ListTopics) are retried; Publish is not (a retry could publish
twice). Failures come back as domain errors, e.g. InvalidArgumentError with the field the server
named, or UnavailableError when Oona does not answer.

    client = OonaClient("127.0.0.1:50051")
    await client.publish("esper.metrics", payload, content_type="application/json")
    async for envelope in client.subscribe("esper.metrics", start=StartPosition.EARLIEST):
        ...
    await client.close()
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import grpc

from esper.clients.base import AioClient
from esper.clients.topics import KERNEL_READY_CONTENT_TYPE, KERNEL_READY_TOPIC
from esper.oona.model import StartPosition
from esper.serving.client import ChannelConfig, stream_call
from esper.v1 import common_pb2, oona_pb2, oona_pb2_grpc

_START = {
    StartPosition.LATEST: oona_pb2.SUBSCRIBE_START_LATEST,
    StartPosition.EARLIEST: oona_pb2.SUBSCRIBE_START_EARLIEST,
    StartPosition.OFFSET: oona_pb2.SUBSCRIBE_START_OFFSET,
}


class OonaClient(AioClient):
    """Publish, subscribe (offset or consumer group), ack and list topics on one Oona server."""

    service = "Oona"

    def __init__(self, config: ChannelConfig | str, *, timeout_s: float = 10.0, retry=None):
        super().__init__(config, timeout_s=timeout_s, retry=retry)
        self._stub = oona_pb2_grpc.OonaServiceStub(self._channel)

    async def publish(self, topic: str, payload: bytes, *, key: str = "", content_type: str = "",
                      headers: Mapping[str, str] | None = None, source: str = "", idempotency_key: str = "",
                      timeout: float | None = None) -> oona_pb2.PublishResponse:
        """Publish one message; returns its message id and offset. Retried only with an
        `idempotency_key` (then a retry after a lost reply returns the first offset, no duplicate)."""
        request = oona_pb2.PublishRequest(topic=topic, payload=payload, key=key, content_type=content_type,
                                          headers=dict(headers or {}), source=source, idempotency_key=idempotency_key)
        return await self.publish_request(request, timeout=timeout)

    async def publish_request(self, request: oona_pb2.PublishRequest, *,
                              timeout: float | None = None) -> oona_pb2.PublishResponse:
        """Publish a prepared `PublishRequest` (e.g. one that waited in a backlog); retried only
        when it carries an idempotency_key."""
        return await self._unary(self._stub.Publish, request, idempotent=bool(request.idempotency_key),
                                 timeout=timeout)

    async def publish_batch(self, messages: list[oona_pb2.PublishRequest], *,
                            timeout: float | None = None) -> list[oona_pb2.PublishResponse]:
        """Publish several messages in one call, in order (all validated before any is stored).
        Never retried."""
        request = oona_pb2.PublishBatchRequest(messages=messages)
        return list((await self._unary(self._stub.PublishBatch, request, idempotent=False, timeout=timeout)).results)

    async def subscribe(self, topic: str, *, start: StartPosition = StartPosition.LATEST, from_offset: int = 0,
                        consumer_group: str = "", consumer_name: str = "", visibility_timeout_s: float = 0.0,
                        max_in_flight: int = 0, max_batch: int = 0,
                        timeout: float = 24 * 3600.0) -> AsyncIterator[oona_pb2.Envelope]:
        """Stream envelopes until the caller stops iterating or `timeout` (the stream's deadline)
        passes. With `consumer_group`, each envelope must be acked with `ack()`. `max_batch` > 1
        asks the server for batched responses (fewer stream messages); envelopes come out one by one."""
        request = oona_pb2.SubscribeRequest(
            topic=topic, start=_START[StartPosition(start)], from_offset=from_offset, consumer_group=consumer_group,
            consumer_name=consumer_name, visibility_timeout_seconds=visibility_timeout_s,
            max_in_flight=max_in_flight, max_batch=max_batch)
        call = stream_call(self._stub.Subscribe, request, timeout=timeout)
        try:
            async for response in call:
                if response.batch:
                    for envelope in response.batch:
                        yield envelope
                else:
                    yield response.message
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.CANCELLED:
                return
            raise self._error(err) from err
        finally:
            call.cancel()

    async def ack(self, topic: str, consumer_group: str, message_ids: list[str], *,
                  timeout: float | None = None) -> int:
        """Acknowledge consumer-group deliveries; returns how many were still pending. Retried
        (acking twice is harmless)."""
        request = oona_pb2.AckRequest(topic=topic, consumer_group=consumer_group, message_ids=message_ids)
        return (await self._unary(self._stub.Ack, request, idempotent=True, timeout=timeout)).acked

    async def list_topics(self, *, timeout: float | None = None) -> list[oona_pb2.TopicInfo]:
        """Every topic with its retained window and consumer groups. Retried."""
        reply = await self._unary(self._stub.ListTopics, oona_pb2.ListTopicsRequest(), idempotent=True,
                                  timeout=timeout)
        return list(reply.topics)


class KernelReadyPublisher:
    """`esper.tezzeret.jobs.KernelEventPublisher` over Oona: `KernelReadyEvent`s on the
    kernel-ready topic, keyed by kernel id. Each carries the idempotency key
    ``kernel-ready.<job id>``, so a publish whose reply was lost is retried without duplicating it."""

    def __init__(self, config: ChannelConfig | str, *, timeout_s: float = 5.0, topic: str = KERNEL_READY_TOPIC):
        self.client = OonaClient(config, timeout_s=timeout_s)
        self.address = self.client.address
        self.topic = topic

    async def close(self) -> None:
        await self.client.close()

    async def publish_kernel_ready(self, event: common_pb2.KernelReadyEvent) -> None:
        await self.client.publish(self.topic, event.SerializeToString(), key=event.artifact.kernel_id,
                                  content_type=KERNEL_READY_CONTENT_TYPE, source="tezzeret",
                                  idempotency_key=f"kernel-ready.{event.job_id}")
