"""Oona against careless clients and crashes: Subscribe batches cut to fit the message size, and
idempotent Publish when the server dies between storing a message and replying (both backends)."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from esper.oona import OonaBus, open_backend
from esper.oona.backend import OonaBackend
from esper.serving import GrpcServer, ServerConfig, error_info_from
from esper.v1 import oona_pb2, oona_pb2_grpc
from services.oona.servicer import SERVICE_NAME, OonaServicer

pytestmark = pytest.mark.integration
MiB = 1024 * 1024


@pytest.fixture(params=["memory", "redis"])
def backend_url(request):
    if request.param == "redis":
        return f"{request.getfixturevalue('redis_server').url}?namespace=hard-{uuid.uuid4().hex[:8]}"
    return "memory://"


async def _serve(backend: OonaBackend) -> GrpcServer:
    server = GrpcServer(ServerConfig(grace_seconds=0))
    server.add_service(SERVICE_NAME, OonaServicer(OonaBus(backend)), oona_pb2_grpc.add_OonaServiceServicer_to_server)
    await server.start()
    await server.set_serving()
    return server


def test_subscribe_batches_are_cut_to_fit_the_message_size(backend_url):
    async def scenario():
        backend = open_backend(backend_url)
        server = await _serve(backend)
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = oona_pb2_grpc.OonaServiceStub(channel)
                for i in range(10):
                    await stub.Publish(oona_pb2.PublishRequest(topic="big", payload=bytes([i]) * MiB), timeout=10)
                call = stub.Subscribe(oona_pb2.SubscribeRequest(
                    topic="big", start=oona_pb2.SUBSCRIBE_START_EARLIEST, max_batch=10), timeout=20)
                offsets, responses = [], 0
                async for response in call:
                    responses += 1
                    assert response.ByteSize() <= 4 * MiB
                    offsets += [m.offset for m in response.batch]
                    if len(offsets) == 10:
                        call.cancel()
                        break
                assert offsets == list(range(10))
                assert responses >= 3  # 10 MiB cannot travel in fewer 4 MiB messages
        finally:
            await server.stop(0)
            await backend.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


class _StoreThenHang(OonaBackend):
    """The real backend, except that publish never replies after storing: the moment a server
    dies between store and reply."""

    def __init__(self, inner: OonaBackend):
        self.inner = inner
        self.stored = asyncio.Event()

    async def publish(self, topic, message):
        await self.inner.publish(topic, message)
        self.stored.set()
        await asyncio.Event().wait()

    def __getattr__(self, name):
        return getattr(self.inner, name)



for _name in ("bounds", "read", "create_group", "group_exists", "read_group", "redeliver_own_expired",
              "pending_count", "ack", "remove_consumer", "list_topics"):
    setattr(_StoreThenHang, _name, (lambda n: lambda self, *a, **k: getattr(self.inner, n)(*a, **k))(_name))
_StoreThenHang.__abstractmethods__ = frozenset()


def test_publish_retried_with_its_idempotency_key_after_a_crash_is_stored_once(backend_url):
    async def scenario():
        backend = open_backend(backend_url)
        hanging = _StoreThenHang(backend)
        server = await _serve(hanging)
        request = oona_pb2.PublishRequest(topic="orders", payload=b"once", idempotency_key="job-42.ready")
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = oona_pb2_grpc.OonaServiceStub(channel)
            call = stub.Publish(request, timeout=10)
            await asyncio.wait_for(hanging.stored.wait(), 10)
            await server.stop(0)  # the server goes away after storing, before replying
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        # A fresh server on the same storage (Redis: a new backend object, as after a restart).
        fresh = backend if backend_url.startswith("memory") else open_backend(backend_url)
        server = await _serve(fresh)
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = oona_pb2_grpc.OonaServiceStub(channel)
                retried = await stub.Publish(request, timeout=5)
                other = await stub.Publish(oona_pb2.PublishRequest(topic="orders", payload=b"next",
                                                                   idempotency_key="job-43.ready"), timeout=5)
                again = await stub.Publish(request, timeout=5)
                assert retried.offset == 0 and again.offset == 0 and other.offset == 1
                topics = await stub.ListTopics(oona_pb2.ListTopicsRequest(), timeout=5)
                (orders,) = [t for t in topics.topics if t.name == "orders"]
                assert orders.next_offset == 2 and orders.retained_messages == 2
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Publish(oona_pb2.PublishRequest(topic="orders", payload=b"x",
                                                               idempotency_key="no spaces"), timeout=5)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert error_info_from(info.value).metadata["field"] == "idempotency_key"
        finally:
            await server.stop(0)
            await fresh.close()
            if fresh is not backend:
                await backend.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_idempotency_key_expires_with_retention(backend_url):
    async def scenario():
        sep = "&" if "?" in backend_url else "?"
        backend = open_backend(f"{backend_url}{sep}retention=3")
        bus = OonaBus(backend)
        try:
            first = await bus.publish("t", b"a", idempotency_key="k")
            assert (await bus.publish("t", b"a", idempotency_key="k")).offset == first.offset
            for _ in range(300):  # Redis trims whole stream nodes (100 entries), so go well past
                await bus.publish("t", b"filler")
            assert (await bus.publish("t", b"a", idempotency_key="k")).offset > first.offset
        finally:
            await bus.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
