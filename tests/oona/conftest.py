import asyncio
import uuid

import pytest

from esper.oona import InMemoryBackend, OonaBus
from esper.oona.redis_streams import RedisStreamsBackend


@pytest.fixture(params=["memory", "redis"])
def run_bus(request):
    """`run_bus(scenario, retention=N, **bus_kwargs)` runs ``await scenario(bus)`` on a fresh OonaBus
    over the parametrised backend (its own key namespace on the session's real redis-server)."""
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else None

    def run(scenario, retention: int = 10_000, **bus_kwargs):
        async def main():
            if url is None:
                backend = InMemoryBackend(retention=retention)
            else:
                backend = RedisStreamsBackend(url, retention=retention, namespace=f"test-{uuid.uuid4().hex[:10]}")
            bus_kwargs.setdefault("poll_seconds", 0.2)
            bus = OonaBus(backend, **bus_kwargs)
            try:
                return await asyncio.wait_for(scenario(bus), timeout=60)
            finally:
                await bus.close()

        return asyncio.run(main())

    run.backend_name = request.param
    return run
