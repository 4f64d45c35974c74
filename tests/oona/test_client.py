"""`esper.clients.OonaClient` against a real Oona server process."""

from __future__ import annotations

import asyncio
import socket

import pytest

from esper.clients import OonaClient
from esper.errors import InvalidArgumentError, NotFoundError, UnavailableError
from esper.oona import StartPosition
from esper.serving import ServerProcess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def address(tmp_path_factory):
    log = tmp_path_factory.mktemp("oona-client") / "oona.log"
    with ServerProcess.python_module("services.oona", "--port", "0", stderr_path=log) as server:
        yield server.address


def test_publish_subscribe_group_ack_and_listing(address):
    async def scenario():
        async with OonaClient(address) as client:
            for i in range(3):
                reply = await client.publish("c.topic", f"m{i}".encode(), key="k", source="test",
                                             headers={"i": str(i)})
                assert reply.offset == i
            got = []
            async for envelope in client.subscribe("c.topic", start=StartPosition.EARLIEST, timeout=10):
                got.append(envelope)
                if len(got) == 3:
                    break
            assert [e.payload for e in got] == [b"m0", b"m1", b"m2"] and got[1].headers["i"] == "1"
            delivered = []
            async for envelope in client.subscribe("c.topic", start=StartPosition.EARLIEST, consumer_group="g",
                                                   consumer_name="w1", timeout=10):
                delivered.append(envelope.message_id)
                if len(delivered) == 3:
                    break
            assert await client.ack("c.topic", "g", delivered) == 3
            topics = {t.name: t for t in await client.list_topics()}
            assert topics["c.topic"].next_offset == 3 and list(topics["c.topic"].consumer_groups) == ["g"]

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_errors_come_back_as_domain_errors(address):
    async def scenario():
        async with OonaClient(address) as client:
            with pytest.raises(InvalidArgumentError) as info:
                await client.publish("bad topic", b"x")
            assert info.value.field == "topic"
            with pytest.raises(NotFoundError):
                await client.ack("c.none", "nobody", ["0"])
            with pytest.raises(InvalidArgumentError) as info:
                async for _ in client.subscribe("c.topic", start=StartPosition.OFFSET, from_offset=-1, timeout=5):
                    pass
            assert info.value.field == "from_offset"

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = f"127.0.0.1:{s.getsockname()[1]}"
        async with OonaClient(dead, timeout_s=2) as client:
            with pytest.raises(UnavailableError, match="Oona at"):
                await client.list_topics()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_client_batches(address):
    from esper.v1 import oona_pb2

    async def scenario():
        async with OonaClient(address) as client:
            results = await client.publish_batch([oona_pb2.PublishRequest(topic="c.batch", payload=b"%d" % i)
                                                  for i in range(10)])
            assert [r.offset for r in results] == list(range(10))
            got = []
            async for envelope in client.subscribe("c.batch", start=StartPosition.EARLIEST, max_batch=4, timeout=10):
                got.append(envelope.offset)
                if len(got) == 10:
                    break
            assert got == list(range(10))

    asyncio.run(asyncio.wait_for(scenario(), 60))
