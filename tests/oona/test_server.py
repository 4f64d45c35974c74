"""The Oona server as a real process (`python -m services.oona --port 0`) over real channels, on
both backends: health, reflection, bad-input statuses, groups, and 4 x 5,000 concurrent publishes."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from esper.serving import ServerProcess, error_info_from, open_aio_channel, open_sync_channel
from esper.v1 import oona_pb2, oona_pb2_grpc

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["memory", "redis"])
def oona_address(request, tmp_path_factory):
    if request.param == "redis":
        url = f"{request.getfixturevalue('redis_server').url}?namespace=srv-{uuid.uuid4().hex[:8]}"
    else:
        url = "memory://"
    log = tmp_path_factory.mktemp("oona") / "oona.log"
    with ServerProcess.python_module("services.oona", "--port", "0", "--backend", url, stderr_path=log) as server:
        yield server.address


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


def test_health_and_reflection_answer(oona_address):
    with open_sync_channel(oona_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "esper.v1.OonaService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "esper.v1.OonaService" in services and "grpc.health.v1.Health" in services


async def _expect_error(call, code: grpc.StatusCode, field: str | None = None, words: str = "") -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    assert words in info.value.details()
    if field is not None:
        error_info = error_info_from(info.value)
        assert error_info is not None and error_info.metadata["field"] == field


async def _first_message(stub, request, timeout=5.0):
    call = stub.Subscribe(request, timeout=timeout)
    async for response in call:
        call.cancel()
        return response.message
    raise AssertionError("stream ended without a message")


def test_bad_inputs_get_their_status_codes_and_the_server_keeps_serving(oona_address):
    async def scenario():
        async with open_aio_channel(oona_address) as channel:
            stub = oona_pb2_grpc.OonaServiceStub(channel)
            topic = f"bad.{uuid.uuid4().hex[:8]}"
            await stub.Publish(oona_pb2.PublishRequest(topic=topic, payload=b"x"), timeout=5)
            S = oona_pb2.SubscribeRequest
            await _expect_error(stub.Publish(oona_pb2.PublishRequest(topic="", payload=b"x"), timeout=5),
                                grpc.StatusCode.INVALID_ARGUMENT, "topic", "topic is empty")
            await _expect_error(stub.Publish(oona_pb2.PublishRequest(topic="a b", payload=b"x"), timeout=5),
                                grpc.StatusCode.INVALID_ARGUMENT, "topic")
            bad_subscriptions = [
                (S(topic="", start=oona_pb2.SUBSCRIBE_START_EARLIEST), "topic"),
                (S(topic=topic, start=oona_pb2.SUBSCRIBE_START_OFFSET, from_offset=-5), "from_offset"),
                (S(topic=topic, start=oona_pb2.SUBSCRIBE_START_OFFSET, from_offset=10), "from_offset"),
                (S(topic=topic, start=oona_pb2.SUBSCRIBE_START_LATEST, from_offset=3), "from_offset"),
                (S(topic=topic, start=42), "start"),
                (S(topic=topic, consumer_name="lonely"), "consumer_name"),
                (S(topic=topic, consumer_group="g", max_in_flight=-1), "max_in_flight"),
                (S(topic=topic, consumer_group="g", visibility_timeout_seconds=-2), "visibility_timeout_seconds"),
                (S(topic=topic, consumer_group="bad group"), "consumer_group"),
            ]
            for request, field in bad_subscriptions:
                await _expect_error(_first_message(stub, request), grpc.StatusCode.INVALID_ARGUMENT, field)
            await _expect_error(stub.Ack(oona_pb2.AckRequest(topic=topic, consumer_group="nobody",
                                                             message_ids=["0"]), timeout=5),
                                grpc.StatusCode.NOT_FOUND, None, "'nobody' does not exist")
            await _expect_error(stub.Ack(oona_pb2.AckRequest(topic=topic, consumer_group="g",
                                                             message_ids=["zero"]), timeout=5),
                                grpc.StatusCode.INVALID_ARGUMENT, "message_ids[0]")
            # Still serving: a normal publish and read work after all of that.
            reply = await stub.Publish(oona_pb2.PublishRequest(topic=topic, payload=b"y"), timeout=5)
            assert reply.offset == 1
            message = await _first_message(stub, S(topic=topic, start=oona_pb2.SUBSCRIBE_START_OFFSET,
                                                   from_offset=1))
            assert message.payload == b"y"

    _run(scenario())


def test_envelope_fields_groups_ack_redelivery_and_topic_listing(oona_address):
    async def scenario():
        async with open_aio_channel(oona_address) as channel:
            stub = oona_pb2_grpc.OonaServiceStub(channel)
            topic = f"grp.{uuid.uuid4().hex[:8]}"
            await stub.Publish(oona_pb2.PublishRequest(topic=topic, key="k", content_type="application/json",
                                                       payload=b'{"a":1}', headers={"x": "1"}, source="test"),
                               timeout=5)
            group = oona_pb2.SubscribeRequest(topic=topic, start=oona_pb2.SUBSCRIBE_START_EARLIEST,
                                              consumer_group="g", consumer_name="first",
                                              visibility_timeout_seconds=0.3)
            first = await _first_message(stub, group)
            assert (first.topic, first.offset, first.key, first.content_type, first.payload, dict(first.headers),
                    first.source, first.delivery_attempt) == (topic, 0, "k", "application/json", b'{"a":1}',
                                                              {"x": "1"}, "test", 1)
            assert first.message_id == "0" and first.publish_time.seconds > 0
            # Not acked: after the visibility timeout another member gets it again.
            group.consumer_name = "second"
            again = await _first_message(stub, group)
            assert (again.message_id, again.delivery_attempt) == ("0", 2)
            ack = await stub.Ack(oona_pb2.AckRequest(topic=topic, consumer_group="g", message_ids=["0"]),
                                 timeout=5)
            assert ack.acked == 1
            listing = await stub.ListTopics(oona_pb2.ListTopicsRequest(), timeout=5)
            info = {t.name: t for t in listing.topics}[topic]
            assert (info.first_offset, info.next_offset, info.retained_messages, list(info.consumer_groups)) == (
                0, 1, 1, ["g"])

    _run(scenario())


PUBLISHERS = 4
PER_PUBLISHER = 5000


def test_four_concurrent_publishers_5000_each_delivered_at_least_once_in_order(oona_address):
    async def scenario():
        topic = f"load.{uuid.uuid4().hex[:8]}"
        total = PUBLISHERS * PER_PUBLISHER
        channels = [open_aio_channel(oona_address) for _ in range(PUBLISHERS + 1)]
        try:
            reader_stub = oona_pb2_grpc.OonaServiceStub(channels[-1])
            offsets_seen: list[int] = []
            per_publisher: dict[int, list[int]] = {p: [] for p in range(PUBLISHERS)}
            group_seen: set[int] = set()

            async def offset_reader():
                call = reader_stub.Subscribe(oona_pb2.SubscribeRequest(
                    topic=topic, start=oona_pb2.SUBSCRIBE_START_OFFSET, from_offset=0), timeout=110)
                async for response in call:
                    m = response.message
                    offsets_seen.append(m.offset)
                    p, i = m.payload.split(b":")
                    per_publisher[int(p)].append(int(i))
                    if len(offsets_seen) == total:
                        call.cancel()
                        return

            async def group_reader():
                call = reader_stub.Subscribe(oona_pb2.SubscribeRequest(
                    topic=topic, start=oona_pb2.SUBSCRIBE_START_EARLIEST, consumer_group="load",
                    max_in_flight=2000), timeout=110)
                pending: list[str] = []
                async for response in call:
                    group_seen.add(response.message.offset)
                    pending.append(response.message.message_id)
                    if len(pending) >= 500 or len(group_seen) == total:
                        await reader_stub.Ack(oona_pb2.AckRequest(topic=topic, consumer_group="load",
                                                                  message_ids=pending), timeout=10)
                        pending = []
                    if len(group_seen) == total:
                        call.cancel()
                        return

            async def publisher(p: int):
                stub = oona_pb2_grpc.OonaServiceStub(channels[p])
                for i in range(PER_PUBLISHER):
                    await stub.Publish(oona_pb2.PublishRequest(topic=topic, payload=b"%d:%d" % (p, i)), timeout=10)

            # Create the group before publishing so it starts at offset 0 on an empty topic.
            readers = [asyncio.ensure_future(offset_reader()), asyncio.ensure_future(group_reader())]
            await asyncio.sleep(0.3)
            await asyncio.gather(*(publisher(p) for p in range(PUBLISHERS)))
            await asyncio.wait_for(asyncio.gather(*readers), timeout=60)
        finally:
            for channel in channels:
                await channel.close()
        assert offsets_seen == list(range(total)), "offset subscriber must see every offset once, in order"
        for p, sequence in per_publisher.items():
            assert sequence == list(range(PER_PUBLISHER)), f"publisher {p}'s messages out of order or missing"
        assert group_seen == set(range(total)), "consumer group must receive every message at least once"

    _run(scenario())


def test_redis_going_away_gives_unavailable_and_the_server_keeps_serving(tmp_path):
    from esper.oona.local_redis import LocalRedisServer

    redis = LocalRedisServer()
    try:
        url = redis.start()
    except Exception as exc:  # noqa: BLE001 - only the missing binary is a reason to skip
        pytest.skip(f"redis-server unavailable: {exc}")
    with ServerProcess.python_module("services.oona", "--port", "0", "--backend", url,
                                     stderr_path=tmp_path / "oona.log") as server:
        with open_sync_channel(server.address) as channel:
            stub = oona_pb2_grpc.OonaServiceStub(channel)
            assert stub.Publish(oona_pb2.PublishRequest(topic="t", payload=b"1"), timeout=5).offset == 0
            redis.stop()
            with pytest.raises(grpc.RpcError) as info:
                stub.Publish(oona_pb2.PublishRequest(topic="t", payload=b"2"), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
            assert error_info_from(info.value).reason == "BACKEND_UNAVAILABLE"
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert server.stop() == 0


def test_publish_batch_and_batched_subscribe(oona_address):
    async def scenario():
        async with open_aio_channel(oona_address) as channel:
            stub = oona_pb2_grpc.OonaServiceStub(channel)
            topic = f"batch.{uuid.uuid4().hex[:8]}"
            reply = await stub.PublishBatch(oona_pb2.PublishBatchRequest(messages=[
                oona_pb2.PublishRequest(topic=topic, payload=b"%d" % i) for i in range(300)]), timeout=10)
            assert [r.offset for r in reply.results] == list(range(300))
            call = stub.Subscribe(oona_pb2.SubscribeRequest(topic=topic, start=oona_pb2.SUBSCRIBE_START_EARLIEST,
                                                            max_batch=100), timeout=10)
            offsets, sizes = [], []
            async for response in call:
                assert not response.HasField("message")
                sizes.append(len(response.batch))
                offsets += [e.offset for e in response.batch]
                if len(offsets) == 300:
                    call.cancel()
                    break
            assert offsets == list(range(300)) and max(sizes) == 100
            await _expect_error(stub.PublishBatch(oona_pb2.PublishBatchRequest(messages=[
                oona_pb2.PublishRequest(topic=topic, payload=b"ok"), oona_pb2.PublishRequest(topic="", payload=b"x")]),
                timeout=5), grpc.StatusCode.INVALID_ARGUMENT, "messages[1].topic")
            await _expect_error(_first_message(stub, oona_pb2.SubscribeRequest(topic=topic, max_batch=-1)),
                                grpc.StatusCode.INVALID_ARGUMENT, "max_batch")

    _run(scenario())
