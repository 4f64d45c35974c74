import os

import pytest
import torch

# esper-train's default is services.mode local (it starts Urza, Tezzeret, Oona and Tamiyo);
# the default suite uses the in-process controller unless a test asks for services explicitly.
os.environ.setdefault("ESPER_SERVICES_MODE", "off")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server on a free 127.0.0.1 port in a temp dir, for the whole session."""
    from esper.oona.local_redis import LocalRedisServer, RedisServerUnavailable

    try:
        server = LocalRedisServer()
        server.start()
    except RedisServerUnavailable as exc:
        pytest.skip(f"redis-server unavailable ({exc}); `make build` installs the apt package redis-server")
    yield server
    server.stop()
