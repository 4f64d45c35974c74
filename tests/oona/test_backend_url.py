"""Backend selection by URL."""

import asyncio

import pytest

from esper.errors import InvalidArgumentError
from esper.oona import InMemoryBackend, OutgoingMessage, open_backend
from esper.oona.redis_streams import RedisStreamsBackend


def test_default_and_memory_urls_give_the_in_memory_backend():
    assert isinstance(open_backend(None), InMemoryBackend)
    backend = open_backend("memory://?retention=7&retention_bytes=100")
    assert isinstance(backend, InMemoryBackend)
    assert (backend.retention, backend.retention_bytes) == (7, 100)


def test_redis_url_gives_a_working_redis_backend(redis_server):
    backend = open_backend(f"{redis_server.url}?retention=9&namespace=url-test")
    assert isinstance(backend, RedisStreamsBackend)
    assert (backend.retention, backend.namespace) == (9, "url-test")

    async def scenario():
        try:
            await backend.ping()
            assert (await backend.publish("t", OutgoingMessage(b"x"))).offset == 0
        finally:
            await backend.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(("url", "words"), [
    ("kafka://localhost", "unknown scheme"),
    ("memory://?retention=0", "positive integer"),
    ("memory://?colour=blue", "unknown option"),
])
def test_bad_urls_are_rejected_with_a_clear_message(url, words):
    with pytest.raises(InvalidArgumentError, match=words):
        open_backend(url)


def test_unreachable_redis_is_unavailable_not_internal():
    import socket

    from esper.errors import UnavailableError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = open_backend(f"redis://127.0.0.1:{port}/0")

    async def scenario():
        try:
            with pytest.raises(UnavailableError, match="is unavailable") as info:
                await backend.publish("t", OutgoingMessage(b"x"))
            assert info.value.reason == "BACKEND_UNAVAILABLE"
            with pytest.raises(UnavailableError):
                await backend.ping()
        finally:
            await backend.close()

    asyncio.run(scenario())
