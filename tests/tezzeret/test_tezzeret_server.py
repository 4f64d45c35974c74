"""Tezzeret as a real server process, with real Urza and Oona servers, over real channels."""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from esper.kasmina.blueprints import get_blueprint
from esper.serving import ServerProcess, error_info_from, open_sync_channel
from esper.tezzeret import load_kernel_artifact
from esper.v1 import (
    common_pb2,
    oona_pb2,
    oona_pb2_grpc,
    tezzeret_pb2,
    tezzeret_pb2_grpc,
    urza_pb2,
    urza_pb2_grpc,
)

pytestmark = pytest.mark.integration
T = tezzeret_pb2
CPU, F32, F64 = common_pb2.DEVICE_TYPE_CPU, common_pb2.D_TYPE_FLOAT32, common_pb2.D_TYPE_FLOAT64
# Large enough that one compile takes tens of seconds on a CPU: the job is still running when the
# tests time it out, cancel it or kill its worker.
HEAVY_SHAPE = [-1, 256, 128, 128]


class Cluster:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.urza = ServerProcess([sys.executable, "-m", "services.urza", "--port", "0", "--data-dir",
                                   str(tmp / "urza")], stderr_path=tmp / "urza.log")
        self.oona = ServerProcess([sys.executable, "-m", "services.oona", "--port", "0"],
                                  stderr_path=tmp / "oona.log")
        self.urza.start()
        self.oona.start()
        self.tezzeret = ServerProcess(
            [sys.executable, "-m", "services.tezzeret", "--port", "0", "--urza", self.urza.address,
             "--oona", self.oona.address, "--workers", "2", "--default-timeout", "120"],
            stderr_path=tmp / "tezzeret.log", start_timeout=180)
        self.tezzeret.start()
        self.channels = [open_sync_channel(p.address) for p in (self.tezzeret, self.urza, self.oona)]
        self.stub = tezzeret_pb2_grpc.TezzeretServiceStub(self.channels[0])
        self.urza_stub = urza_pb2_grpc.UrzaServiceStub(self.channels[1])
        self.oona_stub = oona_pb2_grpc.OonaServiceStub(self.channels[2])

    def worker_pids(self) -> set[int]:
        """Tezzeret's compile workers: its spawned children (not multiprocessing's resource tracker)."""
        pid = self.tezzeret.process.pid
        # children are listed per thread: replacements are started from the pool's slot threads
        children = [c for task in Path(f"/proc/{pid}/task").iterdir()
                    for c in (task / "children").read_text().split()]
        workers = set()
        for child in children:
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            except FileNotFoundError:
                continue
            if b"spawn_main" in cmdline:
                workers.add(int(child))
        return workers

    def stop(self) -> list[int | None]:
        for channel in self.channels:
            channel.close()
        return [self.tezzeret.stop(), self.oona.stop(), self.urza.stop()]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("tezzeret"))
    yield cluster
    assert cluster.stop() == [0, 0, 0], "every server must exit cleanly on SIGTERM"


def request(blueprint_id="residual_mlp", dims=(-1, 16), dtype=F32, **kw) -> T.CompileRequest:
    return T.CompileRequest(blueprint_id=blueprint_id, input_shape=common_pb2.TensorShape(dims=list(dims)),
                            device=CPU, dtype=dtype, **kw)


def watch(stub, job_id: str, timeout: float = 120) -> list[T.CompileJob]:
    return [m.job for m in stub.WatchCompileJob(T.WatchCompileJobRequest(job_id=job_id), timeout=timeout)]


def wait_running(stub, job_id: str, timeout: float = 60) -> T.CompileJob:
    for message in stub.WatchCompileJob(T.WatchCompileJobRequest(job_id=job_id), timeout=timeout):
        if message.job.state != T.COMPILE_JOB_STATE_QUEUED:
            return message.job
    raise AssertionError("job ended without running")


def expect_code(code, fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    assert info.value.code() == code, info.value.details()
    return info.value


def test_health_and_reflection(cluster):
    with open_sync_channel(cluster.tezzeret.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="esper.v1.TezzeretService"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert "esper.v1.TezzeretService" in ProtoReflectionDescriptorDatabase(channel).get_services()


def test_compile_stores_a_validated_artifact_reuses_it_and_announces_it(cluster):
    stub = cluster.stub
    job = stub.Compile(request("residual_mlp", (-1, 24)), timeout=30).job
    assert job.state in (T.COMPILE_JOB_STATE_QUEUED, T.COMPILE_JOB_STATE_RUNNING) and job.kernel_id
    states = [j.state for j in watch(stub, job.job_id)]
    assert states[-1] == T.COMPILE_JOB_STATE_SUCCEEDED, states
    assert T.COMPILE_JOB_STATE_RUNNING in states or states[0] != T.COMPILE_JOB_STATE_QUEUED
    done = stub.GetCompileJob(T.GetCompileJobRequest(job_id=job.job_id), timeout=10).job
    artifact = done.artifact
    assert artifact.status == common_pb2.ARTIFACT_STATUS_VALIDATED and artifact.format == "torch.export/pt2"
    assert artifact.parameter_count > 0 and artifact.latency_us > 0 and not done.reused
    # the artifact is in Urza; download it and load it as the trainer would
    stored = cluster.urza_stub.GetArtifact(urza_pb2.GetArtifactRequest(kernel_id=job.kernel_id), timeout=10).artifact
    assert stored.sha256 == artifact.sha256
    data = b"".join(m.chunk for m in cluster.urza_stub.DownloadArtifact(
        urza_pb2.DownloadArtifactRequest(kernel_id=job.kernel_id), timeout=30) if m.WhichOneof("content") == "chunk")
    assert hashlib.sha256(data).hexdigest() == artifact.sha256
    seed = load_kernel_artifact(data, expected_sha256=artifact.sha256)
    assert torch.equal(seed(torch.randn(5, 24)), torch.zeros(5, 24))
    # the same request again reuses the artifact without compiling
    again = stub.Compile(request("residual_mlp", (-1, 24)), timeout=30).job
    assert again.reused and again.state == T.COMPILE_JOB_STATE_SUCCEEDED and again.kernel_id == job.kernel_id
    assert again.artifact.sha256 == artifact.sha256
    # a kernel-ready event went to Oona
    event = None
    for message in cluster.oona_stub.Subscribe(oona_pb2.SubscribeRequest(
            topic="esper.kernel.ready", start=oona_pb2.SUBSCRIBE_START_EARLIEST), timeout=10):
        candidate = common_pb2.KernelReadyEvent.FromString(message.message.payload)
        if candidate.job_id == job.job_id:
            event = (message.message, candidate)
            break
    assert event is not None
    envelope, ready = event
    assert envelope.key == job.kernel_id and envelope.source == "tezzeret"
    assert "esper.v1.KernelReadyEvent" in envelope.content_type
    assert ready.artifact.kernel_id == job.kernel_id and ready.artifact.status == common_pb2.ARTIFACT_STATUS_VALIDATED


def test_identical_concurrent_requests_compile_once(cluster):
    futures = [cluster.stub.Compile.future(request("norm_mlp", (-1, 20)), timeout=30) for _ in range(4)]
    jobs = [f.result().job for f in futures]
    assert len({j.kernel_id for j in jobs}) == 1
    for job in jobs:
        assert watch(cluster.stub, job.job_id)[-1].state == T.COMPILE_JOB_STATE_SUCCEEDED
    listed = cluster.stub.ListCompileJobs(T.ListCompileJobsRequest(page_size=1000), timeout=10).jobs
    compiled = [j for j in listed if j.kernel_id == jobs[0].kernel_id and not j.reused]
    assert len(compiled) == 1, "identical requests must share one compile (joined or reused)"


def test_inline_invalid_blueprint_is_invalid_argument_and_server_keeps_serving(cluster):
    spec = get_blueprint("residual_mlp")
    spec.blueprint_id = "inline_bad"
    spec.layers[1].op = 77
    err = expect_code(grpc.StatusCode.INVALID_ARGUMENT, cluster.stub.Compile,
                      T.CompileRequest(blueprint=spec, input_shape=common_pb2.TensorShape(dims=[-1, 16]),
                                       device=CPU, dtype=F32), timeout=30)
    assert error_info_from(err).metadata["field"] == "blueprint.layers[1].op"
    spec.layers[1].op = common_pb2.BLUEPRINT_OP_RELU
    job = cluster.stub.Compile(T.CompileRequest(blueprint=spec, input_shape=common_pb2.TensorShape(dims=[-1, 8]),
                                                device=CPU, dtype=F64), timeout=30).job
    assert watch(cluster.stub, job.job_id)[-1].state == T.COMPILE_JOB_STATE_SUCCEEDED
    assert cluster.urza_stub.GetBlueprint(urza_pb2.GetBlueprintRequest(blueprint_id="inline_bad"), timeout=10)


def test_blueprint_that_does_not_fit_the_shape_is_recorded_invalid(cluster):
    job = cluster.stub.Compile(request("conv3x3", (-1, 16)), timeout=30).job
    final = watch(cluster.stub, job.job_id)[-1]
    assert final.state == T.COMPILE_JOB_STATE_FAILED and "INVALID" in final.error and "input_kind" in final.error
    stored = cluster.urza_stub.GetArtifact(urza_pb2.GetArtifactRequest(kernel_id=job.kernel_id), timeout=10).artifact
    assert stored.status == common_pb2.ARTIFACT_STATUS_INVALID and "input_kind" in stored.status_reason
    again = cluster.stub.Compile(request("conv3x3", (-1, 16)), timeout=30).job
    assert again.reused and again.state == T.COMPILE_JOB_STATE_FAILED and "input_kind" in again.error


@pytest.mark.parametrize("bad, code, field", [
    (T.CompileRequest(input_shape=common_pb2.TensorShape(dims=[-1, 16]), device=CPU, dtype=F32),
     grpc.StatusCode.INVALID_ARGUMENT, "blueprint_id"),
    (request(dims=(16,)), grpc.StatusCode.INVALID_ARGUMENT, "input_shape.dims"),
    (request(dims=(8, 16)), grpc.StatusCode.INVALID_ARGUMENT, "input_shape.dims"),
    (request(dtype=0), grpc.StatusCode.INVALID_ARGUMENT, "dtype"),
    (request(timeout_seconds=-1), grpc.StatusCode.INVALID_ARGUMENT, "timeout_seconds"),
    (request(blueprint_id="no_such_blueprint"), grpc.StatusCode.NOT_FOUND, None),
])
def test_bad_requests(cluster, bad, code, field):
    err = expect_code(code, cluster.stub.Compile, bad, timeout=30)
    if field:
        assert error_info_from(err).metadata["field"] == field
    expect_code(grpc.StatusCode.NOT_FOUND, cluster.stub.GetCompileJob, T.GetCompileJobRequest(job_id="job-nope"),
                timeout=10)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_failed_precondition(cluster):
    bad = request()
    bad.device = common_pb2.DEVICE_TYPE_CUDA
    expect_code(grpc.StatusCode.FAILED_PRECONDITION, cluster.stub.Compile, bad, timeout=30)


def test_timeout_kills_the_worker_and_reports_timed_out(cluster):
    before = cluster.worker_pids()
    job = cluster.stub.Compile(request("conv3x3", HEAVY_SHAPE, timeout_seconds=2), timeout=30).job
    final = watch(cluster.stub, job.job_id, timeout=60)[-1]
    assert final.state == T.COMPILE_JOB_STATE_TIMED_OUT and "timeout of 2 s" in final.error
    assert final.end_time.ToDatetime() >= final.start_time.ToDatetime()
    # no artifact is recorded for a timeout (it says nothing about the blueprint)
    expect_code(grpc.StatusCode.NOT_FOUND, cluster.urza_stub.GetArtifact,
                urza_pb2.GetArtifactRequest(kernel_id=job.kernel_id), timeout=10)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and (len(cluster.worker_pids()) < 2 or cluster.worker_pids() == before):
        time.sleep(0.2)
    after = cluster.worker_pids()
    assert len(after) == 2 and after != before, (before, after)


def test_killed_worker_is_replaced_and_its_job_failed(cluster):
    job = cluster.stub.Compile(request("conv3x3", HEAVY_SHAPE, dtype=F64), timeout=30).job
    running = wait_running(cluster.stub, job.job_id)
    assert running.state == T.COMPILE_JOB_STATE_RUNNING
    # Kill every worker process: the one compiling this job is among them (which one it is cannot
    # be told from outside); idle ones must be replaced as well.
    killed = cluster.worker_pids()
    assert len(killed) == 2
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    final = watch(cluster.stub, job.job_id)[-1]
    assert final.state == T.COMPILE_JOB_STATE_FAILED and "died" in final.error and "signal 9" in final.error
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (len(cluster.worker_pids()) < 2 or cluster.worker_pids() & killed):
        time.sleep(0.2)
    assert len(cluster.worker_pids()) == 2 and not cluster.worker_pids() & killed
    ok = cluster.stub.Compile(request("lora_adapter", (-1, 12)), timeout=30).job
    assert watch(cluster.stub, ok.job_id)[-1].state == T.COMPILE_JOB_STATE_SUCCEEDED


def test_cancel_a_running_job(cluster):
    job = cluster.stub.Compile(request("conv3x3", HEAVY_SHAPE, timeout_seconds=300), timeout=30).job
    wait_running(cluster.stub, job.job_id)
    cancelled = cluster.stub.CancelCompileJob(T.CancelCompileJobRequest(job_id=job.job_id), timeout=30).job
    assert cancelled.state == T.COMPILE_JOB_STATE_CANCELLED
    expect_code(grpc.StatusCode.FAILED_PRECONDITION, cluster.stub.CancelCompileJob,
                T.CancelCompileJobRequest(job_id=job.job_id), timeout=10)


def test_list_jobs_by_state_with_paging(cluster):
    done = cluster.stub.Compile(request("residual_mlp", (-1, 10)), timeout=30).job
    watch(cluster.stub, done.job_id)
    everything = cluster.stub.ListCompileJobs(T.ListCompileJobsRequest(page_size=1000), timeout=10).jobs
    assert done.job_id in {j.job_id for j in everything}
    succeeded = cluster.stub.ListCompileJobs(T.ListCompileJobsRequest(state=T.COMPILE_JOB_STATE_SUCCEEDED),
                                             timeout=10).jobs
    assert succeeded and all(j.state == T.COMPILE_JOB_STATE_SUCCEEDED for j in succeeded)
    seen, token = [], ""
    while True:
        page = cluster.stub.ListCompileJobs(T.ListCompileJobsRequest(page_size=2, page_token=token), timeout=10)
        assert len(page.jobs) <= 2
        seen += [j.job_id for j in page.jobs]
        token = page.next_page_token
        if not token:
            break
    assert seen == [j.job_id for j in everything]
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, cluster.stub.ListCompileJobs,
                T.ListCompileJobsRequest(page_token="%%%"), timeout=10)


def test_tezzeret_refuses_to_start_without_urza():
    import socket
    import subprocess

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "services.tezzeret", "--port", "0", "--urza", f"127.0.0.1:{port}",
                           "--urza-wait", "1", "--workers", "1"], capture_output=True, timeout=120)
    assert proc.returncode == 1
    assert b"LISTENING" not in proc.stdout
    assert b"not SERVING" in proc.stderr
