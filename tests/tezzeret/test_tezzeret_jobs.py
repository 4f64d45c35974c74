"""CompileJobs with a real worker pool and a real (in-process) Urza library, no network."""

from __future__ import annotations

import asyncio

import pytest

from esper.kasmina.blueprints import CATALOG
from esper.tezzeret import CompileJobs, WorkerPool, kernel_id_for, warm_up_compiler
from esper.urza import UrzaLibrary
from esper.v1 import common_pb2, tezzeret_pb2

T = tezzeret_pb2
CPU, F32 = common_pb2.DEVICE_TYPE_CPU, common_pb2.D_TYPE_FLOAT32


class InProcessLibrary:
    """The `KernelLibrary` interface over a real UrzaLibrary (blocking calls in threads)."""

    def __init__(self, library: UrzaLibrary):
        self.library = library

    async def get_blueprint(self, blueprint_id, version):
        return await asyncio.to_thread(self.library.get_blueprint, blueprint_id, version)

    async def register_blueprint(self, spec):
        return (await asyncio.to_thread(self.library.register_blueprint, spec))[0]

    async def find_artifact(self, kernel_id):
        return await asyncio.to_thread(self.library.find_artifact, kernel_id)

    async def store_artifact(self, artifact, data):
        return (await asyncio.to_thread(self.library.upload_bytes, artifact, data))[0]

    async def record_artifact(self, artifact):
        return await asyncio.to_thread(self.library.record_artifact, artifact)


class Events:
    def __init__(self):
        self.published: list[common_pb2.KernelReadyEvent] = []

    async def publish_kernel_ready(self, event):
        self.published.append(event)


@pytest.fixture(scope="module")
def pool():
    pool = WorkerPool(1, initializer=warm_up_compiler)
    pool.start()
    yield pool
    pool.shutdown()


@pytest.fixture
def library(tmp_path):
    library = UrzaLibrary(tmp_path / "urza")
    for spec in CATALOG.values():
        library.register_blueprint(spec)
    yield library
    library.close()


async def _final(jobs: CompileJobs, job_id: str) -> T.CompileJob:
    async for job in jobs.watch(job_id):
        last = job
    return last


def test_a_result_stored_first_elsewhere_wins_and_the_job_reuses_it(pool, library):
    """Two compiles of one kernel id race (e.g. two Tezzeret servers): the first stored artifact is
    kept (artifacts are immutable) and the later job reports it as reused, not as a failure."""
    events = Events()

    async def scenario():
        jobs = CompileJobs(pool, InProcessLibrary(library), events)
        shape = [-1, 64, 32, 32]  # about a second of compiling: time to store the competitor first
        job = await jobs.compile(T.CompileRequest(blueprint_id="conv3x3", input_shape=common_pb2.TensorShape(
            dims=shape), device=CPU, dtype=F32))
        assert job.kernel_id == kernel_id_for(CATALOG["conv3x3"], shape, CPU, F32)
        competitor = common_pb2.KernelArtifact(
            kernel_id=job.kernel_id, blueprint_id="conv3x3", blueprint_version=1,
            input_shape=common_pb2.TensorShape(dims=shape), device=CPU, dtype=F32,
            status=common_pb2.ARTIFACT_STATUS_VALIDATED, format="torch.export/pt2")
        stored, _ = await asyncio.to_thread(library.upload_bytes, competitor, b"the other server's bytes")
        final = await _final(jobs, job.job_id)
        assert final.state == T.COMPILE_JOB_STATE_SUCCEEDED and final.reused, final
        assert final.artifact.sha256 == stored.sha256
        assert events.published == []  # the winner announced its own artifact
        # a fresh request is a plain reuse
        again = await jobs.compile(T.CompileRequest(blueprint_id="conv3x3", input_shape=common_pb2.TensorShape(
            dims=shape), device=CPU, dtype=F32))
        assert again.reused and again.state == T.COMPILE_JOB_STATE_SUCCEEDED

    asyncio.run(scenario())


def test_compile_publishes_and_records_in_the_library(pool, library):
    events = Events()

    async def scenario():
        jobs = CompileJobs(pool, InProcessLibrary(library), events)
        job = await jobs.compile(T.CompileRequest(blueprint_id="lora_adapter", input_shape=common_pb2.TensorShape(
            dims=[-1, 8]), device=CPU, dtype=F32))
        final = await _final(jobs, job.job_id)
        assert final.state == T.COMPILE_JOB_STATE_SUCCEEDED and not final.reused
        assert [e.artifact.kernel_id for e in events.published] == [job.kernel_id]
        assert library.get_artifact(job.kernel_id).sha256 == final.artifact.sha256
        bad = await jobs.compile(T.CompileRequest(blueprint_id="conv1x1", input_shape=common_pb2.TensorShape(
            dims=[-1, 8]), device=CPU, dtype=F32))
        bad_final = await _final(jobs, bad.job_id)
        assert bad_final.state == T.COMPILE_JOB_STATE_FAILED
        assert library.get_artifact(bad.kernel_id).status == common_pb2.ARTIFACT_STATUS_INVALID
        assert events.published[-1].artifact.status == common_pb2.ARTIFACT_STATUS_INVALID

    asyncio.run(scenario())
