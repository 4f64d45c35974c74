"""Undecodable requests and server reflection v1, on a real Urza server (in process, port 0)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from esper.serving import GrpcServer, ServerConfig, error_info_from
from esper.urza import UrzaLibrary
from esper.v1 import urza_pb2_grpc
from services.urza.servicer import SERVICE_NAME, UrzaServicer

pytestmark = pytest.mark.integration
GARBAGE = b"\x0a\xff\xff\xff\xff\x0f"


async def _urza(tmp_path) -> GrpcServer:
    server = GrpcServer(ServerConfig())
    server.add_service(SERVICE_NAME, UrzaServicer(UrzaLibrary(tmp_path / "urza")),
                       urza_pb2_grpc.add_UrzaServiceServicer_to_server)
    await server.start()
    await server.set_serving()
    return server


def _identity(data: bytes) -> bytes:
    return data


def test_garbage_bytes_are_invalid_argument_on_unary_and_streaming_rpcs(tmp_path):
    async def scenario():
        server = await _urza(tmp_path)
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                calls = {
                    "GetArtifact": channel.unary_unary("/esper.v1.UrzaService/GetArtifact",
                                                       request_serializer=_identity, response_deserializer=_identity)(
                        GARBAGE, timeout=5),
                    "DownloadArtifact": _drain(channel.unary_stream(
                        "/esper.v1.UrzaService/DownloadArtifact", request_serializer=_identity,
                        response_deserializer=_identity)(GARBAGE, timeout=5)),
                    "UploadArtifact": channel.stream_unary(
                        "/esper.v1.UrzaService/UploadArtifact", request_serializer=_identity,
                        response_deserializer=_identity)(iter([GARBAGE]), timeout=5),
                    "Health.Check": channel.unary_unary("/grpc.health.v1.Health/Check",
                                                        request_serializer=_identity,
                                                        response_deserializer=_identity)(GARBAGE, timeout=5),
                }
                for name, call in calls.items():
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call
                    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, info.value)
                    assert "could not be parsed" in info.value.details(), (name, info.value.details())
                    error = error_info_from(info.value)
                    assert error is not None and error.reason == "MALFORMED_REQUEST", name
        finally:
            await server.stop(0)

    asyncio.run(scenario())


async def _drain(call) -> None:
    async for _ in call:
        pass


def test_reflection_v1_and_v1alpha_both_list_services(tmp_path):
    async def scenario():
        server = await _urza(tmp_path)
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                for package in ("v1", "v1alpha"):
                    call = channel.stream_stream(
                        f"/grpc.reflection.{package}.ServerReflection/ServerReflectionInfo",
                        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
                    stream = call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
                    reply = await stream.read()
                    names = {s.name for s in reply.list_services_response.service}
                    assert SERVICE_NAME in names, (package, names)
                    assert "grpc.reflection.v1.ServerReflection" in names
                    # v1 answers file lookups too (grpcurl describe).
                    stream = call(iter([reflection_pb2.ServerReflectionRequest(
                        file_containing_symbol=SERVICE_NAME)]), timeout=5)
                    reply = await stream.read()
                    assert reply.file_descriptor_response.file_descriptor_proto, package
        finally:
            await server.stop(0)

    asyncio.run(scenario())
