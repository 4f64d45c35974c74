"""Prometheus /metrics of the servers: real servers (a process, and one in this process) on port 0,
scraped over real HTTP, with counts that move with the traffic sent to them."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from esper.oona import InMemoryBackend, OonaBus, StartPosition
from esper.oona.metrics import oona_sampler
from esper.serving import GrpcServer, ServerConfig, ServerProcess, open_aio_channel, open_sync_channel
from esper.v1 import common_pb2, oona_pb2, oona_pb2_grpc, urza_pb2, urza_pb2_grpc
from services.oona.servicer import SERVICE_NAME as OONA
from services.oona.servicer import OonaServicer

pytestmark = pytest.mark.integration


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of one real HTTP GET of /metrics."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def metrics_url(log: Path, timeout: float = 10.0) -> str:
    """The URL a server printed on stderr at start ("metrics: http://...")."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(r"metrics: (http://\S+/metrics)", log.read_text() if log.exists() else "")
        if match:
            return match.group(1)
        time.sleep(0.05)
    raise AssertionError(f"no metrics URL in {log}: {log.read_text()}")


def test_urza_process_counts_calls_by_method_and_code(tmp_path):
    log = tmp_path / "urza.log"
    with ServerProcess.python_module("services.urza", "--port", "0", "--metrics-port", "0",
                                     "--data-dir", str(tmp_path / "data"), stderr_path=log) as server:
        url = metrics_url(log)
        before = scrape(url)
        get = dict(grpc_service="esper.v1.UrzaService", grpc_method="GetBlueprint")
        assert value(before, "esper_urza_blueprints") >= 8  # the shipped catalog, registered at start
        with open_sync_channel(server.address) as channel:
            stub = urza_pb2_grpc.UrzaServiceStub(channel)
            for _ in range(3):
                stub.GetBlueprint(urza_pb2.GetBlueprintRequest(blueprint_id="residual_mlp"), timeout=10)
            for _ in range(2):
                with pytest.raises(grpc.RpcError) as info:
                    stub.GetBlueprint(urza_pb2.GetBlueprintRequest(blueprint_id="no_such_blueprint"), timeout=10)
                assert info.value.code() == grpc.StatusCode.NOT_FOUND
            data = b"kernel bytes " * 100
            meta = common_pb2.KernelArtifact(
                kernel_id="residual_mlp-v1-metrics", blueprint_id="residual_mlp", blueprint_version=1,
                input_shape=common_pb2.TensorShape(dims=[-1, 16]), device=common_pb2.DEVICE_TYPE_CPU,
                dtype=common_pb2.D_TYPE_FLOAT32, status=common_pb2.ARTIFACT_STATUS_VALIDATED,
                sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data), format="raw")
            stub.UploadArtifact(iter([urza_pb2.UploadArtifactRequest(metadata=meta),
                                      urza_pb2.UploadArtifactRequest(chunk=data)]), timeout=10)
        after = scrape(url)
    handled = "esper_grpc_server_handled_total"
    assert value(after, handled, **get, grpc_code="OK") - value(before, handled, **get, grpc_code="OK") == 3
    assert value(after, handled, **get, grpc_code="NOT_FOUND") - value(before, handled, **get, grpc_code="NOT_FOUND") == 2
    latency = "esper_grpc_server_handling_seconds_count"
    assert value(after, latency, **get, grpc_code="OK") - value(before, latency, **get, grpc_code="OK") == 3
    assert value(after, "esper_grpc_server_handling_seconds_sum", **get, grpc_code="OK") > 0
    upload = dict(grpc_service="esper.v1.UrzaService", grpc_method="UploadArtifact", grpc_code="OK")
    assert value(after, handled, **upload) == 1
    validated = dict(status="ARTIFACT_STATUS_VALIDATED")
    assert value(after, "esper_urza_artifacts", **validated) == value(before, "esper_urza_artifacts", **validated) + 1
    assert value(after, "esper_urza_artifact_bytes", **validated) - value(before, "esper_urza_artifact_bytes",
                                                                           **validated) == len(data)


def test_in_process_oona_in_flight_stream_and_consumer_lag():
    async def main():
        bus = OonaBus(InMemoryBackend(), poll_seconds=0.05)
        server = GrpcServer(ServerConfig(metrics_port=0))
        server.add_service(OONA, OonaServicer(bus), oona_pb2_grpc.add_OonaServiceServicer_to_server)
        server.metrics.add_sampler(oona_sampler(bus))
        await server.start()
        await server.set_serving()
        url = server.metrics.endpoint.url
        try:
            async with open_aio_channel(server.address) as channel:
                stub = oona_pb2_grpc.OonaServiceStub(channel)
                for i in range(5):
                    await stub.Publish(oona_pb2.PublishRequest(topic="t", payload=b"%d" % i), timeout=5)
                # A consumer group that has read nothing yet lags by everything published.
                await bus.join_group("t", bus.group_options("g", "c1"), start=StartPosition.EARLIEST)
                samples = await asyncio.to_thread(scrape, url)
                assert value(samples, "esper_oona_next_offset", topic="t") == 5
                assert value(samples, "esper_oona_messages_retained", topic="t") == 5
                assert value(samples, "esper_oona_consumer_lag", topic="t", group="g") == 5
                publish = dict(grpc_service="esper.v1.OonaService", grpc_method="Publish", grpc_code="OK")
                assert value(samples, "esper_grpc_server_handled_total", **publish) == 5
                # An open Subscribe stream is in flight until it ends.
                call = stub.Subscribe(oona_pb2.SubscribeRequest(topic="t", start=oona_pb2.SUBSCRIBE_START_EARLIEST),
                                      timeout=30)
                await call.read()
                subscribe = dict(grpc_service="esper.v1.OonaService", grpc_method="Subscribe")
                during = await asyncio.to_thread(scrape, url)
                assert value(during, "esper_grpc_server_in_flight", **subscribe) == 1
                call.cancel()
                deadline = time.monotonic() + 10
                while True:
                    after = await asyncio.to_thread(scrape, url)
                    if value(after, "esper_grpc_server_in_flight", **subscribe) == 0:
                        break
                    assert time.monotonic() < deadline, "the cancelled stream stayed in flight"
                    await asyncio.sleep(0.05)
                assert value(after, "esper_grpc_server_handled_total", **subscribe, grpc_code="CANCELLED") == 1
        finally:
            await server.stop(0)
        # Stopping the server releases the HTTP port too.
        with pytest.raises(OSError):
            urllib.request.urlopen(url, timeout=2)

    asyncio.run(asyncio.wait_for(main(), timeout=60))


def test_metrics_are_off_by_default_and_a_bad_port_is_named():
    async def build() -> GrpcServer:
        return GrpcServer(ServerConfig())

    assert asyncio.run(build()).metrics is None
    with pytest.raises(ValueError, match="metrics_port"):
        ServerConfig(metrics_port=70000).validate()
