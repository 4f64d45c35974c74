"""Urza as a real server process (`python -m services.urza --port 0`) over real channels."""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
import uuid

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from esper.kasmina.blueprints import get_blueprint
from esper.serving import ChannelConfig, ServerProcess, error_info_from, open_sync_channel
from esper.urza.metadata import normalise_database_url
from esper.v1 import common_pb2, urza_pb2, urza_pb2_grpc

pytestmark = pytest.mark.integration
MiB = 1024 * 1024


def start_urza(data_dir, *extra: str) -> ServerProcess:
    proc = ServerProcess([sys.executable, "-m", "services.urza", "--port", "0", "--data-dir", str(data_dir),
                          *extra], stderr_path=data_dir.parent / f"urza-{uuid.uuid4().hex[:6]}.log")
    proc.start()
    return proc


@pytest.fixture(scope="module")
def urza(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("urza") / "data"
    proc = start_urza(data_dir)
    channel = open_sync_channel(proc.address)
    yield proc, urza_pb2_grpc.UrzaServiceStub(channel), data_dir
    channel.close()
    assert proc.stop() == 0, "Urza must exit cleanly on SIGTERM"


def meta_for(kernel_id: str, data: bytes, **kw) -> common_pb2.KernelArtifact:
    return common_pb2.KernelArtifact(
        kernel_id=kernel_id, blueprint_id=kw.get("blueprint_id", "residual_mlp"), blueprint_version=1,
        input_shape=common_pb2.TensorShape(dims=[-1, 16]), device=common_pb2.DEVICE_TYPE_CPU,
        dtype=common_pb2.D_TYPE_FLOAT32, status=common_pb2.ARTIFACT_STATUS_VALIDATED,
        sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data), format="raw", tags=kw.get("tags", []))


def upload_messages(meta, data: bytes, chunk: int = MiB):
    yield urza_pb2.UploadArtifactRequest(metadata=meta)
    for start in range(0, len(data), chunk):
        yield urza_pb2.UploadArtifactRequest(chunk=data[start:start + chunk])


def download(stub, kernel_id: str, chunk_size: int = 0) -> tuple[common_pb2.KernelArtifact, bytes, int]:
    meta, parts, biggest = None, [], 0
    for message in stub.DownloadArtifact(urza_pb2.DownloadArtifactRequest(kernel_id=kernel_id,
                                                                          chunk_size=chunk_size), timeout=120):
        if message.WhichOneof("content") == "metadata":
            meta = message.metadata
        else:
            parts.append(message.chunk)
            biggest = max(biggest, len(message.chunk))
    return meta, b"".join(parts), biggest


def expect_code(code: grpc.StatusCode, fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    assert info.value.code() == code, info.value.details()
    return info.value


def test_health_and_reflection(urza):
    proc, _stub, _ = urza
    with open_sync_channel(proc.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="esper.v1.UrzaService"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "esper.v1.UrzaService" in services and "grpc.health.v1.Health" in services


def test_catalog_is_registered_and_bad_blueprints_are_rejected(urza):
    _proc, stub, _ = urza
    listed = stub.ListBlueprints(urza_pb2.ListBlueprintsRequest(), timeout=10).blueprints
    assert "residual_mlp" in {b.blueprint_id for b in listed}
    spec = get_blueprint("residual_mlp")
    spec.blueprint_id = "server_custom"
    spec.layers[0].kernel_size = 4
    err = expect_code(grpc.StatusCode.INVALID_ARGUMENT, stub.RegisterBlueprint,
                      urza_pb2.RegisterBlueprintRequest(blueprint=spec), timeout=10)
    assert error_info_from(err).metadata["field"] == "blueprint.layers[0].kernel_size"
    assert "kernel_size" in err.details()
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, stub.RegisterBlueprint, urza_pb2.RegisterBlueprintRequest(),
                timeout=10)
    spec.layers[0].kernel_size = 0
    reply = stub.RegisterBlueprint(urza_pb2.RegisterBlueprintRequest(blueprint=spec), timeout=10)
    assert reply.created and reply.blueprint == spec
    assert not stub.RegisterBlueprint(urza_pb2.RegisterBlueprintRequest(blueprint=spec), timeout=10).created
    spec.description = "other content"
    expect_code(grpc.StatusCode.ALREADY_EXISTS, stub.RegisterBlueprint,
                urza_pb2.RegisterBlueprintRequest(blueprint=spec), timeout=10)
    expect_code(grpc.StatusCode.NOT_FOUND, stub.GetBlueprint,
                urza_pb2.GetBlueprintRequest(blueprint_id="nope"), timeout=10)
    got = stub.GetBlueprint(urza_pb2.GetBlueprintRequest(blueprint_id="server_custom"), timeout=10).blueprint
    assert got.blueprint_id == "server_custom" and got.description != "other content"


def test_100mb_artifact_streams_up_and_down_in_chunks(urza):
    _proc, stub, _ = urza
    data = os.urandom(100 * MiB)
    started = time.perf_counter()
    reply = stub.UploadArtifact(upload_messages(meta_for("big-100mb", data), data), timeout=120)
    uploaded = time.perf_counter()
    assert reply.created and reply.artifact.size_bytes == len(data)
    meta, got, biggest = download(stub, "big-100mb")
    downloaded = time.perf_counter()
    assert meta.sha256 == hashlib.sha256(got).hexdigest() == reply.artifact.sha256
    assert got == data and biggest <= MiB
    print(f"100 MiB upload {100 / (uploaded - started):.0f} MiB/s, "
          f"download {100 / (downloaded - uploaded):.0f} MiB/s")
    # Re-uploading the same bytes is a no-op; other bytes under the same id are refused.
    assert not stub.UploadArtifact(upload_messages(meta_for("big-100mb", data), data), timeout=120).created
    small = b"different"
    expect_code(grpc.StatusCode.ALREADY_EXISTS, stub.UploadArtifact,
                upload_messages(meta_for("big-100mb", small), small), timeout=10)


def test_upload_errors_keep_the_server_serving(urza):
    _proc, stub, data_dir = urza
    data = os.urandom(3 * MiB)
    err = expect_code(grpc.StatusCode.INVALID_ARGUMENT, stub.UploadArtifact,
                      upload_messages(meta_for("too-big-chunk", data), data, chunk=2 * MiB), timeout=30)
    assert error_info_from(err).metadata["field"] == "chunk"
    # a message over the server's 4 MiB limit is refused by the transport (this client allows 16 MiB)
    big = os.urandom(6 * MiB)
    proc = urza[0]
    with grpc.insecure_channel(proc.address, options=[("grpc.max_send_message_length", 16 * MiB)]) as raw:
        expect_code(grpc.StatusCode.RESOURCE_EXHAUSTED, urza_pb2_grpc.UrzaServiceStub(raw).UploadArtifact,
                    upload_messages(meta_for("huge-message", big), big, chunk=5 * MiB), timeout=30)
    wrong = meta_for("wrong-sha", data)
    wrong.sha256 = hashlib.sha256(b"other").hexdigest()
    err = expect_code(grpc.StatusCode.INVALID_ARGUMENT, stub.UploadArtifact, upload_messages(wrong, data), timeout=30)
    assert error_info_from(err).metadata["field"] == "metadata.sha256"
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, stub.UploadArtifact,
                iter([urza_pb2.UploadArtifactRequest(chunk=b"x")]), timeout=10)
    evil = meta_for("../../escape", data)
    err = expect_code(grpc.StatusCode.INVALID_ARGUMENT, stub.UploadArtifact, upload_messages(evil, data), timeout=30)
    assert error_info_from(err).metadata["field"] == "metadata.kernel_id"
    expect_code(grpc.StatusCode.NOT_FOUND, stub.UploadArtifact,
                upload_messages(meta_for("orphan", data, blueprint_id="unknown_bp"), data), timeout=30)
    for kernel_id in ("too-big-chunk", "huge-message", "wrong-sha"):
        expect_code(grpc.StatusCode.NOT_FOUND, stub.GetArtifact, urza_pb2.GetArtifactRequest(kernel_id=kernel_id),
                    timeout=10)
    assert not list((data_dir / "blobs" / "tmp").iterdir())
    assert stub.ListBlueprints(urza_pb2.ListBlueprintsRequest(page_size=1), timeout=10).blueprints


def test_upload_cut_halfway_leaves_no_visible_artifact(urza):
    _proc, stub, data_dir = urza
    data = os.urandom(8 * MiB)
    half_sent = threading.Event()
    release = threading.Event()

    def messages():
        yield urza_pb2.UploadArtifactRequest(metadata=meta_for("cut-halfway", data))
        for start in range(0, len(data) // 2, MiB):
            yield urza_pb2.UploadArtifactRequest(chunk=data[start:start + MiB])
        half_sent.set()
        release.wait(30)  # the client dies here

    future = stub.UploadArtifact.future(messages(), timeout=60)
    assert half_sent.wait(30)
    deadline = time.monotonic() + 20
    while not list((data_dir / "blobs" / "tmp").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert list((data_dir / "blobs" / "tmp").iterdir()), "the server should be receiving the upload"
    time.sleep(0.2)  # let more of the first half arrive
    future.cancel()
    release.set()
    deadline = time.monotonic() + 10
    while list((data_dir / "blobs" / "tmp").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not list((data_dir / "blobs" / "tmp").iterdir()), "partial bytes must be discarded"
    expect_code(grpc.StatusCode.NOT_FOUND, stub.GetArtifact, urza_pb2.GetArtifactRequest(kernel_id="cut-halfway"),
                timeout=10)
    reply = stub.QueryArtifacts(urza_pb2.QueryArtifactsRequest(page_size=1000), timeout=10)
    assert "cut-halfway" not in {a.kernel_id for a in reply.artifacts}


def test_corrupted_blob_gives_data_loss(urza):
    _proc, stub, data_dir = urza
    data = os.urandom(200_000)
    reply = stub.UploadArtifact(upload_messages(meta_for("to-corrupt", data), data), timeout=30)
    digest = reply.artifact.sha256
    assert download(stub, "to-corrupt")[1] == data
    path = data_dir / "blobs" / "sha256" / digest[:2] / digest
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    err = expect_code(grpc.StatusCode.DATA_LOSS, download, stub, "to-corrupt")
    assert error_info_from(err).reason == "CHECKSUM_MISMATCH"
    # the server is still fine for others
    assert stub.GetArtifact(urza_pb2.GetArtifactRequest(kernel_id="to-corrupt"), timeout=10).artifact.sha256 == digest


def test_record_and_query(urza):
    _proc, stub, _ = urza
    rejected = meta_for("rejected-kernel", b"")
    rejected.sha256, rejected.size_bytes = "", 0
    rejected.status = common_pb2.ARTIFACT_STATUS_INVALID
    err = expect_code(grpc.StatusCode.INVALID_ARGUMENT, stub.RecordArtifact,
                      urza_pb2.RecordArtifactRequest(artifact=rejected), timeout=10)
    assert error_info_from(err).metadata["field"] == "artifact.status_reason"
    rejected.status_reason = "export failed: unsupported op"
    stub.RecordArtifact(urza_pb2.RecordArtifactRequest(artifact=rejected), timeout=10)
    expect_code(grpc.StatusCode.FAILED_PRECONDITION, download, stub, "rejected-kernel")
    tagged = b"tagged bytes"
    stub.UploadArtifact(upload_messages(meta_for("tagged-kernel", tagged, tags=["gpu-ready", "x"]), tagged),
                        timeout=10)
    found = stub.QueryArtifacts(urza_pb2.QueryArtifactsRequest(
        status=common_pb2.ARTIFACT_STATUS_INVALID), timeout=10).artifacts
    assert "rejected-kernel" in {a.kernel_id for a in found}
    assert all(a.status == common_pb2.ARTIFACT_STATUS_INVALID for a in found)
    found = stub.QueryArtifacts(urza_pb2.QueryArtifactsRequest(tags=["gpu-ready"]), timeout=10).artifacts
    assert [a.kernel_id for a in found] == ["tagged-kernel"]
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, stub.QueryArtifacts,
                urza_pb2.QueryArtifactsRequest(page_token="not-a-token!"), timeout=10)
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, stub.GetArtifact, urza_pb2.GetArtifactRequest(kernel_id=""),
                timeout=10)


def test_server_on_postgresql(postgres_url, tmp_path):
    name = f"urza_srv_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(normalise_database_url(postgres_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = postgres_url.rsplit("/", 1)[0] + "/" + name
    proc = start_urza(tmp_path / "data", "--database-url", url)
    try:
        with open_sync_channel(proc.address) as channel:
            stub = urza_pb2_grpc.UrzaServiceStub(channel)
            data = os.urandom(2 * MiB + 5)
            assert stub.UploadArtifact(upload_messages(meta_for("pg-kernel", data), data), timeout=30).created
            assert download(stub, "pg-kernel")[1] == data
            found = stub.QueryArtifacts(urza_pb2.QueryArtifactsRequest(blueprint_id="residual_mlp"),
                                        timeout=10).artifacts
            assert [a.kernel_id for a in found] == ["pg-kernel"]
    finally:
        assert proc.stop() == 0
    engine = sa.create_engine(normalise_database_url(url))
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM artifacts")).scalar() == 1
        assert conn.execute(sa.text("SELECT count(*) FROM blueprints")).scalar() >= 8
    engine.dispose()


def test_server_with_bearer_token(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("urza-secret\n")
    proc = start_urza(tmp_path / "data", "--auth-token-file", str(token_file), "--no-register-catalog")
    try:
        with open_sync_channel(proc.address) as anonymous:
            health = health_pb2_grpc.HealthStub(anonymous).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            expect_code(grpc.StatusCode.UNAUTHENTICATED, urza_pb2_grpc.UrzaServiceStub(anonymous).ListBlueprints,
                        urza_pb2.ListBlueprintsRequest(), timeout=10)
        with open_sync_channel(ChannelConfig(proc.address, auth_token="wrong")) as wrong:
            expect_code(grpc.StatusCode.UNAUTHENTICATED, urza_pb2_grpc.UrzaServiceStub(wrong).ListBlueprints,
                        urza_pb2.ListBlueprintsRequest(), timeout=10)
        with open_sync_channel(ChannelConfig(proc.address, auth_token="urza-secret")) as channel:
            reply = urza_pb2_grpc.UrzaServiceStub(channel).ListBlueprints(urza_pb2.ListBlueprintsRequest(), timeout=10)
            assert list(reply.blueprints) == []  # --no-register-catalog
    finally:
        assert proc.stop() == 0


def test_blocking_client(urza):
    from esper.clients import UrzaClient
    from esper.errors import DataLossError, InvalidArgumentError, NotFoundError

    proc, _stub, data_dir = urza
    data = os.urandom(2 * MiB + 3)
    with UrzaClient(proc.address) as client:
        bare = meta_for("client-kernel", b"")
        bare.sha256, bare.size_bytes = "", 0  # the client fills them in
        stored, created = client.upload_artifact(bare, data)
        assert created and stored.size_bytes == len(data)
        meta, got = client.download_artifact("client-kernel")
        assert got == data and meta.sha256 == stored.sha256
        assert client.get_artifact("client-kernel") == meta
        assert [a.kernel_id for a in client.query_artifacts(blueprint_id="residual_mlp", page_size=1)
                if a.kernel_id == "client-kernel"] == ["client-kernel"]
        assert client.get_blueprint("residual_mlp").blueprint_id == "residual_mlp"
        with pytest.raises(NotFoundError):
            client.get_artifact("client-missing")
        with pytest.raises(InvalidArgumentError) as info:
            client.get_artifact("bad id with spaces")
        assert info.value.field == "kernel_id"
        path = data_dir / "blobs" / "sha256" / stored.sha256[:2] / stored.sha256
        path.write_bytes(b"x" + path.read_bytes()[1:])
        with pytest.raises(DataLossError):
            client.download_artifact("client-kernel")
