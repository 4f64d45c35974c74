"""Only the compiler may certify: Urza with per-token roles, as real server processes.

A principals file gives each token a name and roles. A trainer's token reads and may store
unvalidated artifacts; only a token with the ``compiler`` role (Tezzeret's) creates VALIDATED ones.
"""

from __future__ import annotations

import hashlib
import json
import sys

import grpc
import pytest

from esper.serving import ChannelConfig, ServerProcess, error_info_from, open_sync_channel
from esper.v1 import common_pb2, tezzeret_pb2, tezzeret_pb2_grpc, urza_pb2, urza_pb2_grpc

pytestmark = pytest.mark.integration


def _meta(kernel_id: str, data: bytes, status: int) -> common_pb2.KernelArtifact:
    return common_pb2.KernelArtifact(
        kernel_id=kernel_id, blueprint_id="residual_mlp", blueprint_version=1,
        input_shape=common_pb2.TensorShape(dims=[-1, 16]), device=common_pb2.DEVICE_TYPE_CPU,
        dtype=common_pb2.D_TYPE_FLOAT32, status=status, sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data), format="raw")


def _upload(stub, meta, data):
    return stub.UploadArtifact(iter([urza_pb2.UploadArtifactRequest(metadata=meta),
                                     urza_pb2.UploadArtifactRequest(chunk=data)]), timeout=10)


def _principals(tmp_path):
    principals = tmp_path / "principals.json"
    principals.write_text(json.dumps({"principals": [
        {"name": "tezzeret", "token": "compiler-secret", "roles": ["compiler"]},
        {"name": "trainer", "token": "trainer-secret", "roles": []},
    ]}))
    (tmp_path / "compiler.token").write_text("compiler-secret\n")
    (tmp_path / "trainer.token").write_text("trainer-secret\n")
    return principals


def _start_urza(tmp_path) -> ServerProcess:
    urza = ServerProcess([sys.executable, "-m", "services.urza", "--port", "0", "--data-dir", str(tmp_path / "u"),
                          "--principals-file", str(_principals(tmp_path))], stderr_path=tmp_path / "urza.log")
    urza.start()
    return urza


def test_only_a_compiler_token_creates_validated_artifacts(tmp_path):
    urza = _start_urza(tmp_path)
    try:
        with open_sync_channel(ChannelConfig(urza.address, auth_token="trainer-secret")) as channel:
            trainer = urza_pb2_grpc.UrzaServiceStub(channel)
            for status in (common_pb2.ARTIFACT_STATUS_VALIDATED, common_pb2.ARTIFACT_STATUS_UNSPECIFIED):
                with pytest.raises(grpc.RpcError) as info:
                    _upload(trainer, _meta(f"forged-{status}", b"evil", status), b"evil")
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value.details()
                assert error_info_from(info.value).reason == "COMPILER_ROLE_REQUIRED"
                assert "trainer" in info.value.details()
            with pytest.raises(grpc.RpcError) as info:
                trainer.GetArtifact(urza_pb2.GetArtifactRequest(kernel_id="forged-2"), timeout=5)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND  # nothing was stored
            # Unvalidated uploads and records, and every read, stay open to the trainer.
            pending = _upload(trainer, _meta("pending-1", b"draft", common_pb2.ARTIFACT_STATUS_PENDING), b"draft")
            assert pending.artifact.status == common_pb2.ARTIFACT_STATUS_PENDING
            invalid = common_pb2.KernelArtifact(
                kernel_id="invalid-1", blueprint_id="residual_mlp", blueprint_version=1,
                input_shape=common_pb2.TensorShape(dims=[-1, 16]), device=common_pb2.DEVICE_TYPE_CPU,
                dtype=common_pb2.D_TYPE_FLOAT32, status=common_pb2.ARTIFACT_STATUS_INVALID, status_reason="no")
            trainer.RecordArtifact(urza_pb2.RecordArtifactRequest(artifact=invalid), timeout=5)
            assert trainer.ListBlueprints(urza_pb2.ListBlueprintsRequest(), timeout=5).blueprints
        with open_sync_channel(ChannelConfig(urza.address, auth_token="compiler-secret")) as channel:
            compiler = urza_pb2_grpc.UrzaServiceStub(channel)
            stored = _upload(compiler, _meta("real-1", b"good", common_pb2.ARTIFACT_STATUS_VALIDATED), b"good")
            assert stored.artifact.status == common_pb2.ARTIFACT_STATUS_VALIDATED
        with open_sync_channel(ChannelConfig(urza.address, auth_token="nobody")) as channel, \
                pytest.raises(grpc.RpcError) as info:
            urza_pb2_grpc.UrzaServiceStub(channel).ListBlueprints(urza_pb2.ListBlueprintsRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

    finally:
        assert urza.stop() == 0


@pytest.mark.slow
def test_tezzeret_stores_validated_kernels_only_with_the_compiler_token(tmp_path):
    urza = _start_urza(tmp_path)
    try:
        # Tezzeret with the compiler's credentials stores a VALIDATED kernel; with the trainer's it cannot.
        for token_file, expected in (("compiler.token", tezzeret_pb2.COMPILE_JOB_STATE_SUCCEEDED),
                                     ("trainer.token", tezzeret_pb2.COMPILE_JOB_STATE_FAILED)):
            tezzeret = ServerProcess(
                [sys.executable, "-m", "services.tezzeret", "--port", "0", "--urza", urza.address, "--workers", "1",
                 "--auth-token-file", str(tmp_path / token_file)],
                stderr_path=tmp_path / f"tezzeret-{token_file}.log", start_timeout=180)
            tezzeret.start()
            try:
                token = (tmp_path / token_file).read_text().strip()
                with open_sync_channel(ChannelConfig(tezzeret.address, auth_token=token)) as channel:
                    stub = tezzeret_pb2_grpc.TezzeretServiceStub(channel)
                    dims = [-1, 16 if expected == tezzeret_pb2.COMPILE_JOB_STATE_SUCCEEDED else 24]
                    job = stub.Compile(tezzeret_pb2.CompileRequest(
                        blueprint_id="residual_mlp", input_shape=common_pb2.TensorShape(dims=dims),
                        device=common_pb2.DEVICE_TYPE_CPU, dtype=common_pb2.D_TYPE_FLOAT32), timeout=30).job
                    final = list(stub.WatchCompileJob(tezzeret_pb2.WatchCompileJobRequest(job_id=job.job_id),
                                                      timeout=120))[-1].job
                    assert final.state == expected, final.error
                    if expected == tezzeret_pb2.COMPILE_JOB_STATE_FAILED:
                        assert "PERMISSION_DENIED" in final.error or "compiler role" in final.error, final.error
            finally:
                assert tezzeret.stop() == 0
    finally:
        assert urza.stop() == 0
