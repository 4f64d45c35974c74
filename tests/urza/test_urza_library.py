"""Urza's domain logic (no network) on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import hashlib
import itertools
import os
import uuid

import pytest
import sqlalchemy as sa

from esper.errors import (
    AlreadyExistsError,
    DataLossError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from esper.kasmina.blueprints import CATALOG, get_blueprint
from esper.urza import UrzaLibrary
from esper.urza.metadata import normalise_database_url
from esper.v1 import common_pb2

VALIDATED = common_pb2.ARTIFACT_STATUS_VALIDATED
INVALID = common_pb2.ARTIFACT_STATUS_INVALID
PENDING = common_pb2.ARTIFACT_STATUS_PENDING
_counter = itertools.count()


@pytest.fixture(params=["sqlite", "postgresql"])
def library(request, tmp_path):
    url = None
    if request.param == "postgresql":
        base = request.getfixturevalue("postgres_url")
        name = f"urza_{uuid.uuid4().hex[:12]}"
        admin = sa.create_engine(normalise_database_url(base), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        url = base.rsplit("/", 1)[0] + "/" + name
    lib = UrzaLibrary(tmp_path / "urza", url)
    for spec in CATALOG.values():
        lib.register_blueprint(spec)
    yield lib
    lib.close()


def artifact(kernel_id: str | None = None, *, blueprint: str = "residual_mlp", shape=(-1, 16),
             status=VALIDATED, tags=(), dtype=common_pb2.D_TYPE_FLOAT32) -> common_pb2.KernelArtifact:
    return common_pb2.KernelArtifact(
        kernel_id=kernel_id or f"k{next(_counter)}", blueprint_id=blueprint, blueprint_version=1,
        input_shape=common_pb2.TensorShape(dims=list(shape)), device=common_pb2.DEVICE_TYPE_CPU,
        dtype=dtype, status=status, format="torch.export/pt2", tags=list(tags))


def test_catalog_registers_and_is_idempotent(library):
    for spec in CATALOG.values():
        stored, created = library.register_blueprint(spec)
        assert not created and stored == spec
    assert library.get_blueprint("residual_mlp") == CATALOG["residual_mlp"]
    page, token = library.list_blueprints(page_size=3)
    assert len(page) == 3 and token
    rest, token2 = library.list_blueprints(page_size=100, page_token=token)
    assert token2 == "" and len(page) + len(rest) == len(CATALOG)
    assert {s.blueprint_id for s in page + rest} == set(CATALOG)


def test_blueprint_versions_and_conflicts(library):
    spec = get_blueprint("residual_mlp")
    spec.description = "changed"
    with pytest.raises(AlreadyExistsError, match="version 1 is already registered"):
        library.register_blueprint(spec)
    spec.version = 2
    assert library.register_blueprint(spec)[1]
    assert library.get_blueprint("residual_mlp").version == 2
    assert library.get_blueprint("residual_mlp", 1).description != "changed"
    with pytest.raises(NotFoundError, match="not registered"):
        library.get_blueprint("residual_mlp", 7)
    with pytest.raises(NotFoundError):
        library.get_blueprint("no_such_blueprint")


@pytest.mark.parametrize("mutate, field", [
    (lambda s: setattr(s, "blueprint_id", "Bad-Id"), "blueprint.blueprint_id"),
    (lambda s: setattr(s, "version", 0), "blueprint.version"),
    (lambda s: setattr(s, "family", ""), "blueprint.family"),
    (lambda s: setattr(s.layers[0], "op", 99), "blueprint.layers[0].op"),
    (lambda s: setattr(s.layers[0], "kernel_size", 4), "blueprint.layers[0].kernel_size"),
    (lambda s: setattr(s.layers[2], "width_multiplier", 3.0), "blueprint.layers[2].width"),
    (lambda s: s.tags.append("bad tag!"), "blueprint.tags[2]"),
])
def test_invalid_blueprint_names_the_field(library, mutate, field):
    spec = get_blueprint("residual_mlp")
    spec.blueprint_id = "custom_mlp"
    mutate(spec)
    with pytest.raises(InvalidArgumentError) as info:
        library.register_blueprint(spec)
    assert info.value.field == field, str(info.value)
    assert field in str(info.value)


def test_upload_download_roundtrip_and_immutability(library):
    data = os.urandom(3 * 1024 * 1024 + 17)
    stored, created = library.upload_bytes(artifact("kern-a", tags=["fast", "cpu"]), data)
    assert created and stored.sha256 == hashlib.sha256(data).hexdigest() and stored.size_bytes == len(data)
    assert stored.status == VALIDATED and stored.tags == ["cpu", "fast"] and stored.create_time.seconds > 0
    meta, chunks = library.open_download("kern-a", chunk_size=100_000)
    chunks = list(chunks)
    assert meta == stored and b"".join(chunks) == data and max(map(len, chunks)) == 100_000
    # same bytes again: no-op; other bytes under the same id: ALREADY_EXISTS
    assert library.upload_bytes(artifact("kern-a"), data)[1] is False
    with pytest.raises(AlreadyExistsError, match="immutable"):
        library.upload_bytes(artifact("kern-a"), data + b"x")
    assert library.read_artifact_bytes("kern-a") == data
    # identical content under another id is stored once (content addressed)
    library.upload_bytes(artifact("kern-b"), data)
    assert len(list((library.data_dir / "blobs" / "sha256").rglob("*"))) == 2  # one prefix dir + one blob


def test_upload_checks_size_sha_and_chunk_limit(library):
    data = b"a" * 1000
    meta = artifact("kern-c")
    meta.sha256, meta.size_bytes = hashlib.sha256(data).hexdigest(), len(data)
    upload = library.begin_upload(meta)
    upload.write(data[:500])
    with pytest.raises(InvalidArgumentError, match="ended after 500 bytes") as info:
        upload.finish()
    assert info.value.field == "metadata.size_bytes"
    assert library.find_artifact("kern-c") is None
    bad = artifact("kern-c")
    bad.sha256, bad.size_bytes = "0" * 64, len(data)
    upload = library.begin_upload(bad)
    upload.write(data)
    with pytest.raises(InvalidArgumentError, match="hash to") as info:
        upload.finish()
    assert info.value.field == "metadata.sha256"
    big = artifact("kern-c")
    big.sha256, big.size_bytes = "0" * 64, 4 * 1024 * 1024
    upload = library.begin_upload(big)
    with pytest.raises(InvalidArgumentError, match="at most 1048576") as info:
        upload.write(b"x" * (1024 * 1024 + 1))
    assert info.value.field == "chunk"
    assert library.find_artifact("kern-c") is None
    assert not list((library.data_dir / "blobs" / "tmp").iterdir()), "no partial upload may remain"


def test_upload_cut_halfway_leaves_nothing(library):
    data = os.urandom(2 * 1024 * 1024)
    meta = artifact("kern-cut")
    meta.sha256, meta.size_bytes = hashlib.sha256(data).hexdigest(), len(data)
    with library.begin_upload(meta) as upload:
        upload.write(data[: len(data) // 2])
        # the stream breaks here: the context exits without finish()
    assert library.find_artifact("kern-cut") is None
    assert library.query_artifacts(blueprint_id="residual_mlp")[0] == []
    assert not list((library.data_dir / "blobs" / "tmp").iterdir())
    assert not list((library.data_dir / "blobs" / "sha256").rglob("*"))


@pytest.mark.parametrize("field, value", [
    ("kernel_id", "../../etc/passwd"), ("kernel_id", ""), ("sha256", "../x"), ("sha256", "ABC"),
    ("size_bytes", -1), ("device", 0), ("dtype", 42), ("blueprint_version", 0),
])
def test_upload_metadata_validation(library, field, value):
    meta = artifact("kern-v")
    meta.sha256, meta.size_bytes = hashlib.sha256(b"x").hexdigest(), 1
    setattr(meta, field, value)
    with pytest.raises(InvalidArgumentError) as info:
        library.begin_upload(meta)
    assert info.value.field == f"metadata.{field}"


def test_upload_needs_registered_blueprint_and_valid_shape(library):
    meta = artifact("kern-x", blueprint="not_registered")
    meta.sha256, meta.size_bytes = hashlib.sha256(b"x").hexdigest(), 1
    with pytest.raises(NotFoundError, match="not registered"):
        library.begin_upload(meta)
    for dims in ([], [-1, 0], [0, 16], [-1, 16, -1]):
        meta = artifact("kern-x", shape=dims)
        meta.sha256, meta.size_bytes = hashlib.sha256(b"x").hexdigest(), 1
        with pytest.raises(InvalidArgumentError) as info:
            library.begin_upload(meta)
        assert info.value.field == "metadata.input_shape.dims"


def test_corrupted_blob_is_data_loss_never_wrong_bytes(library):
    data = os.urandom(50_000)
    stored, _ = library.upload_bytes(artifact("kern-bad"), data)
    path = library.blobs.path_for(stored.sha256)
    os.chmod(path, 0o644)
    corrupted = bytearray(path.read_bytes())
    corrupted[123] ^= 0xFF
    path.write_bytes(bytes(corrupted))
    _meta, chunks = library.open_download("kern-bad")
    with pytest.raises(DataLossError, match="corrupted"):
        next(chunks)
    path.unlink()
    with pytest.raises(DataLossError, match="missing"):
        library.read_artifact_bytes("kern-bad")


def test_large_blob_corruption_detected_in_two_pass_mode(library, monkeypatch):
    import esper.urza.blobs as blobs

    monkeypatch.setattr(blobs, "SINGLE_PASS_LIMIT", 1000)
    data = os.urandom(10_000)
    stored, _ = library.upload_bytes(artifact("kern-big"), data)
    assert library.read_artifact_bytes("kern-big") == data
    path = library.blobs.path_for(stored.sha256)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    _meta, chunks = library.open_download("kern-big", chunk_size=1000)
    with pytest.raises(DataLossError):
        next(chunks)


def test_record_invalid_and_pending_then_complete(library):
    bad = artifact("kern-inv", status=INVALID)
    with pytest.raises(InvalidArgumentError) as info:
        library.record_artifact(bad)
    assert info.value.field == "artifact.status_reason"
    bad.status_reason = "function preservation failed: max |delta| 0.5"
    stored = library.record_artifact(bad)
    assert stored.status == INVALID and stored.sha256 == ""
    assert library.record_artifact(bad) == stored  # identical record: no-op
    with pytest.raises(FailedPreconditionError, match="is INVALID"):
        library.open_download("kern-inv")
    with pytest.raises(AlreadyExistsError):
        library.upload_bytes(artifact("kern-inv"), b"bytes")
    with pytest.raises(InvalidArgumentError) as info:
        library.record_artifact(artifact("kern-val", status=VALIDATED))
    assert info.value.field == "artifact.status"
    library.record_artifact(artifact("kern-pend", status=PENDING))
    done, created = library.upload_bytes(artifact("kern-pend"), b"final bytes")
    assert created and done.status == VALIDATED


def test_query_filters_and_pagination(library):
    library.upload_bytes(artifact("q1", shape=(-1, 16), tags=["a", "b"]), b"1")
    library.upload_bytes(artifact("q2", shape=(-1, 32), tags=["a"]), b"2")
    library.upload_bytes(artifact("q3", blueprint="norm_mlp", shape=(-1, 16), dtype=common_pb2.D_TYPE_FLOAT64), b"3")
    rejected = artifact("q4", status=INVALID, shape=(-1, 16))
    rejected.status_reason = "export failed"
    library.record_artifact(rejected)

    def ids(**kw):
        return [a.kernel_id for a in library.query_artifacts(**kw)[0]]

    assert ids() == ["q1", "q2", "q3", "q4"]
    assert ids(blueprint_id="residual_mlp") == ["q1", "q2", "q4"]
    assert ids(status=VALIDATED) == ["q1", "q2", "q3"]
    assert ids(input_shape=[-1, 16]) == ["q1", "q3", "q4"]
    assert ids(dtype=common_pb2.D_TYPE_FLOAT64) == ["q3"]
    assert ids(device=common_pb2.DEVICE_TYPE_CUDA) == []
    assert ids(tags=["a"]) == ["q1", "q2"] and ids(tags=["a", "b"]) == ["q1"]
    page, token = library.query_artifacts(page_size=3)
    assert [a.kernel_id for a in page] == ["q1", "q2", "q3"] and token
    page, token = library.query_artifacts(page_size=3, page_token=token)
    assert [a.kernel_id for a in page] == ["q4"] and token == ""
    for kwargs, field in (({"page_size": -1}, "page_size"), ({"page_token": "garbage!"}, "page_token"),
                          ({"status": 9}, "status"), ({"input_shape": [-1, 0]}, "input_shape.dims")):
        with pytest.raises(InvalidArgumentError) as info:
            library.query_artifacts(**kwargs)
        assert info.value.field == field


def test_list_blueprints_filters(library):
    def ids(**kw):
        return {s.blueprint_id for s in library.list_blueprints(**kw)[0]}

    mlps = ids(family="mlp")
    assert "residual_mlp" in mlps and all(CATALOG[i].family == "mlp" for i in mlps)
    seq = ids(input_kind=common_pb2.SEED_INPUT_KIND_SEQUENCE)
    assert seq == {i for i, s in CATALOG.items()
                   if s.input_kind in (0, common_pb2.SEED_INPUT_KIND_SEQUENCE)}
    tagged = ids(tags=["residual"])
    assert tagged == {i for i, s in CATALOG.items() if "residual" in s.tags}


def test_metadata_cache_holds_only_finished_artifacts_and_hands_out_copies(library):
    library.record_artifact(artifact("cache-pending", status=PENDING))
    library.get_artifact("cache-pending")
    assert library.cached_artifact("cache-pending") is None  # PENDING may still change
    done, _ = library.upload_bytes(artifact("cache-pending"), b"now final")
    assert library.get_artifact("cache-pending").status == VALIDATED
    cached = library.cached_artifact("cache-pending")
    assert cached == done
    cached.status_reason = "mutated by a caller"
    assert library.cached_artifact("cache-pending").status_reason == ""
    assert library.cached_artifact("never-seen") is None
