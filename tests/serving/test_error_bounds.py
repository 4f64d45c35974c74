"""Errors about huge values quote them cut short, so the status (and its ErrorInfo) still fits in
gRPC's trailers: the client sees the real code, not RESOURCE_EXHAUSTED."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from esper.oona import OonaBus, open_backend
from esper.serving import GrpcServer, ServerConfig, error_info_from
from esper.urza import UrzaLibrary
from esper.v1 import oona_pb2, oona_pb2_grpc, urza_pb2, urza_pb2_grpc
from services.oona.servicer import SERVICE_NAME as OONA
from services.oona.servicer import OonaServicer
from services.urza.servicer import SERVICE_NAME as URZA
from services.urza.servicer import UrzaServicer

pytestmark = pytest.mark.integration
HUGE = "x" * 7000
BOUND = 2048


async def _servers(tmp_path) -> GrpcServer:
    server = GrpcServer(ServerConfig())
    server.add_service(URZA, UrzaServicer(UrzaLibrary(tmp_path / "urza")), urza_pb2_grpc.add_UrzaServiceServicer_to_server)
    server.add_service(OONA, OonaServicer(OonaBus(open_backend("memory://"))),
                       oona_pb2_grpc.add_OonaServiceServicer_to_server)
    await server.start()
    await server.set_serving()
    return server


def test_huge_values_are_quoted_cut_short_on_every_error_path(tmp_path):
    async def scenario():
        server = await _servers(tmp_path)
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                urza = urza_pb2_grpc.UrzaServiceStub(channel)
                oona = oona_pb2_grpc.OonaServiceStub(channel)
                calls = {
                    "GetArtifact(kernel_id)": (urza.GetArtifact(urza_pb2.GetArtifactRequest(kernel_id=HUGE), timeout=5),
                                               grpc.StatusCode.INVALID_ARGUMENT),
                    "GetBlueprint(blueprint_id)": (urza.GetBlueprint(
                        urza_pb2.GetBlueprintRequest(blueprint_id=HUGE), timeout=5), grpc.StatusCode.NOT_FOUND),
                    "ListBlueprints(page_token)": (urza.ListBlueprints(
                        urza_pb2.ListBlueprintsRequest(page_token=HUGE), timeout=5), grpc.StatusCode.INVALID_ARGUMENT),
                    "QueryArtifacts(tags)": (urza.QueryArtifacts(
                        urza_pb2.QueryArtifactsRequest(tags=[HUGE]), timeout=5), grpc.StatusCode.INVALID_ARGUMENT),
                    "Publish(topic)": (oona.Publish(oona_pb2.PublishRequest(topic=HUGE, payload=b"x"), timeout=5),
                                       grpc.StatusCode.INVALID_ARGUMENT),
                    "Ack(message_ids)": (oona.Ack(oona_pb2.AckRequest(topic="t", consumer_group="g",
                                                                      message_ids=[HUGE]), timeout=5),
                                         grpc.StatusCode.INVALID_ARGUMENT),
                }
                for name, (call, code) in calls.items():
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call
                    assert info.value.code() == code, (name, info.value.code(), info.value.details()[:200])
                    assert len(info.value.details()) <= BOUND, name
                    error = error_info_from(info.value)
                    assert error is not None, name
                    assert all(len(v) <= 256 for v in error.metadata.values()), (name, dict(error.metadata))
        finally:
            await server.stop(0)

    asyncio.run(scenario())


def test_make_rpc_status_bounds_message_and_metadata():
    from esper.serving.errors import MAX_METADATA_VALUE_CHARS, MAX_STATUS_MESSAGE_CHARS, make_rpc_status

    status = make_rpc_status(grpc.StatusCode.INVALID_ARGUMENT, "bad " + HUGE, reason="X",
                             metadata={"field": HUGE, **{f"k{i}": "v" for i in range(100)}})
    assert len(status.details) <= MAX_STATUS_MESSAGE_CHARS and status.details.endswith("(7004 chars)")
    blob = dict(status.trailing_metadata)["grpc-status-details-bin"]
    assert len(blob) < 8 * 1024 - len(status.details)
    assert MAX_METADATA_VALUE_CHARS <= 256
