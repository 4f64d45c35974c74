"""One client cannot break listings for everyone: free-text fields have documented size limits,
and list responses are bounded by bytes as well as by count (real Urza server on port 0)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from esper.kasmina.blueprints import get_blueprint
from esper.serving import GrpcServer, ServerConfig, error_info_from
from esper.urza import UrzaLibrary
from esper.v1 import common_pb2, urza_pb2, urza_pb2_grpc
from services.urza.servicer import SERVICE_NAME, UrzaServicer

pytestmark = pytest.mark.integration
MiB = 1024 * 1024


async def _urza(library: UrzaLibrary) -> GrpcServer:
    server = GrpcServer(ServerConfig())
    server.add_service(SERVICE_NAME, UrzaServicer(library), urza_pb2_grpc.add_UrzaServiceServicer_to_server)
    await server.start()
    await server.set_serving()
    return server


def _spec(i: int, description: str) -> common_pb2.BlueprintSpec:
    spec = common_pb2.BlueprintSpec()
    spec.CopyFrom(get_blueprint("residual_mlp"))
    spec.blueprint_id = f"big_{i}"
    spec.description = description
    return spec


def _invalid(i: int, reason: str) -> common_pb2.KernelArtifact:
    return common_pb2.KernelArtifact(
        kernel_id=f"bad-{i}", blueprint_id="residual_mlp", blueprint_version=1,
        input_shape=common_pb2.TensorShape(dims=[-1, 16]), device=common_pb2.DEVICE_TYPE_CPU,
        dtype=common_pb2.D_TYPE_FLOAT32, status=common_pb2.ARTIFACT_STATUS_INVALID, status_reason=reason)


def test_huge_free_text_is_refused_and_listings_keep_working(tmp_path):
    async def scenario():
        library = UrzaLibrary(tmp_path / "urza")
        library.register_blueprint(get_blueprint("residual_mlp"))
        server = await _urza(library)
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = urza_pb2_grpc.UrzaServiceStub(channel)
                for i in range(3):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await stub.RegisterBlueprint(urza_pb2.RegisterBlueprintRequest(
                            blueprint=_spec(i, "d" * (3 * MiB))), timeout=10)
                    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert error_info_from(info.value).metadata["field"] == "blueprint.description"
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await stub.RecordArtifact(urza_pb2.RecordArtifactRequest(
                            artifact=_invalid(i, "r" * (3 * MiB))), timeout=10)
                    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert error_info_from(info.value).metadata["field"] == "artifact.status_reason"
                listed = await stub.ListBlueprints(urza_pb2.ListBlueprintsRequest(), timeout=10)
                assert [b.blueprint_id for b in listed.blueprints] == ["residual_mlp"]
                await stub.QueryArtifacts(urza_pb2.QueryArtifactsRequest(), timeout=10)
        finally:
            await server.stop(0)

    asyncio.run(scenario())


def test_list_pages_are_cut_by_bytes_and_paging_still_sees_everything(tmp_path):
    budget = 64 * 1024
    library = UrzaLibrary(tmp_path / "urza", max_list_response_bytes=budget)
    library.register_blueprint(get_blueprint("residual_mlp"))
    text = "d" * 4000
    for i in range(40):
        library.register_blueprint(_spec(i, text))
        library.record_artifact(_invalid(i, text))
    for lister, key in ((library.list_blueprints, "blueprint_id"), (library.query_artifacts, "kernel_id")):
        seen, token, pages = [], "", 0
        while True:
            page, token = lister(page_size=1000, page_token=token)
            pages += 1
            assert page, "a page holds at least one item"
            assert sum(item.ByteSize() for item in page) <= budget
            seen += [getattr(item, key) for item in page]
            if not token:
                break
        assert pages >= 3, pages
        assert len(seen) == len(set(seen)) and len(seen) >= 40


def test_downloading_an_invalid_artifact_is_failed_precondition(tmp_path):
    import hashlib

    from esper.errors import FailedPreconditionError

    library = UrzaLibrary(tmp_path / "urza")
    library.register_blueprint(get_blueprint("residual_mlp"))
    data = b"bytes the compiler rejected"
    meta = _invalid(0, "preservation check failed")
    meta.sha256, meta.size_bytes = hashlib.sha256(data).hexdigest(), len(data)
    library.upload_bytes(meta, data)
    with pytest.raises(FailedPreconditionError) as info:
        library.open_download("bad-0")
    assert info.value.reason == "ARTIFACT_INVALID" and "preservation check failed" in info.value.message
