"""Tezzeret against oversized requests and Urza outages.

- Configured limits on parameters, FLOPs and a worker's memory are checked before anything is
  built: RESOURCE_EXHAUSTED naming the limit, through a real server on port 0.
- A compile whose result cannot be stored because Urza is down is stored once Urza is back
  (retried with backoff), instead of failing the job (real Urza process killed and restarted).
"""

from __future__ import annotations

import asyncio
import socket
import sys

import grpc
import pytest
from test_tezzeret_jobs import InProcessLibrary

from esper.clients import AsyncUrzaClient as UrzaClient
from esper.kasmina.blueprints import CATALOG
from esper.serving import ChannelConfig, GrpcServer, ServerConfig, ServerProcess, error_info_from
from esper.tezzeret import CompileJobs, CompileLimits, WorkerPool, kernel_id_for, warm_up_compiler
from esper.urza import UrzaLibrary
from esper.v1 import common_pb2, tezzeret_pb2, tezzeret_pb2_grpc
from services.tezzeret.servicer import SERVICE_NAME, TezzeretServicer

pytestmark = pytest.mark.integration
T = tezzeret_pb2
CPU, F32 = common_pb2.DEVICE_TYPE_CPU, common_pb2.D_TYPE_FLOAT32


def _request(blueprint_id: str, dims) -> T.CompileRequest:
    return T.CompileRequest(blueprint_id=blueprint_id, input_shape=common_pb2.TensorShape(dims=list(dims)),
                            device=CPU, dtype=F32)


@pytest.mark.parametrize("limits, blueprint_id, dims, limit_name", [
    (CompileLimits(), "residual_mlp", [-1, 30000], "max_parameters"),
    (CompileLimits(max_flops_per_sample=10_000), "conv3x3", [-1, 8, 16, 16], "max_flops_per_sample"),
    (CompileLimits(worker_memory_bytes=1 << 20), "conv3x3", [-1, 64, 64, 64], "worker_memory_bytes"),
])
def test_limits_are_checked_before_building(limits, blueprint_id, dims, limit_name, tmp_path):
    library = UrzaLibrary(tmp_path / "urza")
    for spec in CATALOG.values():
        library.register_blueprint(spec)

    async def scenario():
        pool = WorkerPool(1)  # never started: a request past a limit must not reach a worker
        jobs = CompileJobs(pool, InProcessLibrary(library), limits=limits)
        server = GrpcServer(ServerConfig())
        server.add_service(SERVICE_NAME, TezzeretServicer(jobs), tezzeret_pb2_grpc.add_TezzeretServiceServicer_to_server)
        await server.start()
        await server.set_serving()
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = tezzeret_pb2_grpc.TezzeretServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Compile(_request(blueprint_id, dims), timeout=10)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
                assert limit_name in info.value.details()
                error = error_info_from(info.value)
                assert error.reason == "COMPILE_LIMIT_EXCEEDED" and error.metadata["limit"] == limit_name
                listed = await stub.ListCompileJobs(T.ListCompileJobsRequest(), timeout=5)
                assert list(listed.jobs) == []
        finally:
            await server.stop(0)

    asyncio.run(scenario())
    assert library.query_artifacts()[0] == []  # nothing was compiled or recorded


def test_compile_limits_reject_nonsense_configuration():
    with pytest.raises(ValueError, match="max_parameters"):
        CompileLimits(max_parameters=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_result_is_stored_after_an_urza_outage(tmp_path):
    port = _free_port()
    command = [sys.executable, "-m", "services.urza", "--port", str(port), "--data-dir", str(tmp_path / "urza")]

    async def scenario(urza: ServerProcess):
        pool = WorkerPool(1, initializer=warm_up_compiler)
        await asyncio.to_thread(pool.start)
        client = UrzaClient(ChannelConfig(f"127.0.0.1:{port}"), timeout_s=2.0)
        jobs = CompileJobs(pool, client, store_retry_s=60.0)
        try:
            job = await jobs.compile(_request("residual_mlp", [-1, 40]))
            await asyncio.to_thread(urza.kill)  # SIGKILL while the worker compiles
            await asyncio.sleep(3.0)  # the compile finishes and its store fails meanwhile
            assert jobs.get(job.job_id).state not in (T.COMPILE_JOB_STATE_FAILED,), jobs.get(job.job_id).error
            restarted = ServerProcess(command, stderr_path=tmp_path / "urza-2.log")
            await asyncio.to_thread(restarted.start)
            try:
                async for snapshot in jobs.watch(job.job_id):
                    final = snapshot
                assert final.state == T.COMPILE_JOB_STATE_SUCCEEDED, final.error
                stored = await client.find_artifact(job.kernel_id)
                assert stored is not None and stored.status == common_pb2.ARTIFACT_STATUS_VALIDATED
            finally:
                await asyncio.to_thread(restarted.stop)
        finally:
            await jobs.close()
            await client.close()

    urza = ServerProcess(command, stderr_path=tmp_path / "urza-1.log")
    urza.start()
    try:
        asyncio.run(asyncio.wait_for(scenario(urza), 180))
    finally:
        urza.kill()


def test_invalid_reasons_are_cut_to_what_urza_accepts():
    from esper.tezzeret import jobs
    from esper.urza import library

    assert jobs.MAX_STATUS_REASON_CHARS == library.MAX_STATUS_REASON_CHARS


def test_list_compile_jobs_is_bounded_by_bytes(tmp_path):
    """300 jobs that each carry a 16 KiB reason (about 10 MiB) still list, page by page."""
    library = UrzaLibrary(tmp_path / "urza")
    spec = CATALOG["residual_mlp"]
    library.register_blueprint(spec)
    reason = "r" * 16000
    for width in range(8, 308):
        dims = [-1, width]
        library.record_artifact(common_pb2.KernelArtifact(
            kernel_id=kernel_id_for(spec, dims, CPU, F32), blueprint_id="residual_mlp", blueprint_version=1,
            input_shape=common_pb2.TensorShape(dims=dims), device=CPU, dtype=F32,
            status=common_pb2.ARTIFACT_STATUS_INVALID, status_reason=reason))

    async def scenario():
        jobs = CompileJobs(WorkerPool(1), InProcessLibrary(library))
        server = GrpcServer(ServerConfig())
        server.add_service(SERVICE_NAME, TezzeretServicer(jobs), tezzeret_pb2_grpc.add_TezzeretServiceServicer_to_server)
        await server.start()
        await server.set_serving()
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = tezzeret_pb2_grpc.TezzeretServiceStub(channel)
                for width in range(8, 308):
                    job = (await stub.Compile(_request("residual_mlp", [-1, width]), timeout=10)).job
                    assert job.reused and job.state == T.COMPILE_JOB_STATE_FAILED
                seen, token = [], ""
                while True:
                    page = await stub.ListCompileJobs(T.ListCompileJobsRequest(page_size=1000, page_token=token),
                                                      timeout=10)
                    assert page.jobs and page.ByteSize() < 4 * 2**20
                    seen += [j.job_id for j in page.jobs]
                    token = page.next_page_token
                    if not token:
                        break
                assert len(seen) == len(set(seen)) == 300
        finally:
            await server.stop(0)

    asyncio.run(scenario())
