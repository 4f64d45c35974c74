"""Urza: the library of blueprints and compiled kernel artifacts (no grpc here).

`UrzaLibrary(data_dir, database_url=None)` keeps metadata in SQLAlchemy (SQLite file
``data_dir/urza.db`` by default, PostgreSQL by URL) and artifact bytes in a content-addressed
`BlobStore` under ``data_dir/blobs``. Blueprints and artifacts are `esper.v1` messages: they are
plain data here. Every method is blocking; servers call them from worker threads.

Rules it enforces:
- blueprint registration validates the spec (InvalidArgumentError naming the field, e.g.
  ``blueprint.layers[2].kernel_size``); the same id+version with the same content is a no-op,
  with other content AlreadyExistsError;
- artifacts are immutable: the same kernel id with other bytes is AlreadyExistsError (a PENDING
  placeholder may be completed once);
- an upload becomes visible only after all bytes arrived and hash to the declared SHA-256;
- every read of artifact bytes is verified (DataLossError on mismatch, never wrong bytes).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sqlalchemy as sa

from esper.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    quoted,
)
from esper.urza import metadata as md
from esper.urza.blobs import BlobStore, is_sha256_hex
from esper.urza.policies import PolicyShelf
from esper.v1 import common_pb2

KernelArtifact = common_pb2.KernelArtifact
BlueprintSpec = common_pb2.BlueprintSpec

MAX_CHUNK_BYTES = 1024 * 1024
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
DEFAULT_MAX_ARTIFACT_BYTES = 4 * 1024**3
# Size limits on what one client may store, so a stored record can never make a listing (or a
# single Get) larger than a gRPC message. Documented in proto/esper/v1/common.proto.
MAX_DESCRIPTION_CHARS = 4096
MAX_STATUS_REASON_CHARS = 16384
MAX_FORMAT_CHARS = 64
MAX_LAYERS = 64
MAX_TAGS = 32
MAX_BLUEPRINT_BYTES = 64 * 1024
# A list response stops adding items at this many bytes (half the default 4 MiB message limit),
# whatever page_size asked for; next_page_token continues after the last item sent.
DEFAULT_MAX_LIST_RESPONSE_BYTES = 2 * 1024 * 1024
# Metadata of finished artifacts kept in memory (they are immutable, so a cached copy never goes stale).
DEFAULT_METADATA_CACHE_ENTRIES = 10_000
_FINAL_STATUSES = (common_pb2.ARTIFACT_STATUS_VALIDATED, common_pb2.ARTIFACT_STATUS_INVALID)

_BLUEPRINT_ID = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_KERNEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,199}$")
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/=+-]{0,127}$")
# Chunk sizes a blueprint is checked at when registered (its layers are relative to the chunk).
_CHECK_CHUNK_SIZES = (16, 32, 64, 128, 256)
_KINDS = (common_pb2.SEED_INPUT_KIND_FEATURES, common_pb2.SEED_INPUT_KIND_SEQUENCE,
          common_pb2.SEED_INPUT_KIND_IMAGE)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _set_time(field, value: dt.datetime) -> None:
    if value.tzinfo is None:  # SQLite hands back naive datetimes; they were stored as UTC
        value = value.replace(tzinfo=dt.UTC)
    field.FromDatetime(value)


def shape_text(dims: Sequence[int]) -> str:
    """Canonical text of a shape for exact-match queries: ``[-1, 32]`` -> ``"-1,32"``."""
    return ",".join(str(int(d)) for d in dims)


def validate_shape(dims: Sequence[int], field: str) -> None:
    """A seed input shape: 1..8 dims, the first -1 (dynamic batch) or positive, the rest positive."""
    dims = list(dims)
    if not 1 <= len(dims) <= 8:
        raise InvalidArgumentError(f"{field} must have 1 to 8 dims, got {dims}", field=field)
    if dims[0] != -1 and dims[0] < 1:
        raise InvalidArgumentError(f"{field} batch dim must be -1 (dynamic) or >= 1, got {dims}", field=field)
    if any(d < 1 for d in dims[1:]):
        raise InvalidArgumentError(f"{field} dims after the batch must be >= 1, got {dims}", field=field)


def validate_kernel_id(kernel_id: str, field: str = "kernel_id") -> None:
    if not _KERNEL_ID.match(kernel_id):
        raise InvalidArgumentError(
            f"{field} must be 1-200 characters of letters, digits and _.:@+- starting with a letter or digit, "
            f"got {quoted(kernel_id)}", field=field)


def _validate_tags(tags: Iterable[str], field: str) -> list[str]:
    tags = list(tags)
    if len(tags) > MAX_TAGS:
        raise InvalidArgumentError(f"{field} has {len(tags)} tags; at most {MAX_TAGS}", field=field)
    for i, tag in enumerate(tags):
        if not _TAG.match(tag):
            raise InvalidArgumentError(
                f"{field}[{i}] must be 1-128 characters of letters, digits and _.:/=+- , got {quoted(tag)}",
                field=f"{field}[{i}]")
    return sorted(set(tags))


def _enum_name(enum, value: int) -> str:
    try:
        return enum.Name(value)
    except ValueError:
        return str(value)


def _validate_enum(enum, value: int, field: str, *, allow_unspecified: bool = False) -> None:
    if value not in enum.values() or (value == 0 and not allow_unspecified):
        allowed = [n for n in enum.keys() if not n.endswith("_UNSPECIFIED")]  # noqa: SIM118 - proto enum API
        raise InvalidArgumentError(f"{field} must be one of {allowed}, got {_enum_name(enum, value)}",
                                   field=field)


def spec_sha256(spec: BlueprintSpec) -> str:
    """SHA-256 of the deterministic serialisation of a blueprint (its content identity)."""
    return hashlib.sha256(spec.SerializeToString(deterministic=True)).hexdigest()


def validate_blueprint_spec(spec: BlueprintSpec, field: str = "blueprint") -> None:
    """Check a blueprint before it enters the library; InvalidArgumentError names the field.

    The structure is checked by the Kasmina blueprint validator for each input kind the
    blueprint claims (every kind when it leaves input_kind unspecified), at the chunk sizes it
    accepts; it must fit at least one common chunk size.
    """
    from esper.kasmina.blueprints import BlueprintError, validate_blueprint

    if not _BLUEPRINT_ID.match(spec.blueprint_id):
        raise InvalidArgumentError(
            f"{field}.blueprint_id must be lower_snake_case (a-z, 0-9, _; starts with a letter; <= 64 chars), "
            f"got {quoted(spec.blueprint_id)}", field=f"{field}.blueprint_id")
    if spec.version < 1:
        raise InvalidArgumentError(f"{field}.version must be >= 1, got {spec.version}", field=f"{field}.version")
    if not spec.family or len(spec.family) > 64:
        raise InvalidArgumentError(f"{field}.family must be a non-empty name (<= 64 chars), e.g. 'mlp', "
                                   f"got {quoted(spec.family)}", field=f"{field}.family")
    _check_length(spec.description, MAX_DESCRIPTION_CHARS, f"{field}.description")
    if len(spec.layers) > MAX_LAYERS:
        raise InvalidArgumentError(f"{field}.layers has {len(spec.layers)} layers; at most {MAX_LAYERS}",
                                   field=f"{field}.layers")
    if spec.ByteSize() > MAX_BLUEPRINT_BYTES:
        raise InvalidArgumentError(f"{field} serialises to {spec.ByteSize()} bytes; at most {MAX_BLUEPRINT_BYTES}",
                                   field=field)
    _validate_enum(common_pb2.SeedInputKind, spec.input_kind, f"{field}.input_kind", allow_unspecified=True)
    if spec.min_chunk_size < 0:
        raise InvalidArgumentError(f"{field}.min_chunk_size must be >= 0, got {spec.min_chunk_size}",
                                   field=f"{field}.min_chunk_size")
    _validate_tags(spec.tags, f"{field}.tags")
    kinds = (spec.input_kind,) if spec.input_kind else _KINDS
    chunks = sorted({max(spec.min_chunk_size, 1), *(c for c in _CHECK_CHUNK_SIZES if c >= spec.min_chunk_size)})
    for kind in kinds:
        last_error: BlueprintError | None = None
        for chunk in chunks:
            try:
                validate_blueprint(spec, chunk, kind)
                last_error = None
                break
            except BlueprintError as err:
                last_error = err
        if last_error is not None:
            where = f"{field}.{last_error.field}"
            raise InvalidArgumentError(
                f"{where}: {last_error.problem} (blueprint {quoted(spec.blueprint_id)}, "
                f"{_enum_name(common_pb2.SeedInputKind, kind)} inputs)", field=where)


def _check_length(text: str, limit: int, field: str) -> None:
    if len(text) > limit:
        raise InvalidArgumentError(f"{field} is {len(text)} characters; at most {limit}", field=field)


def _fit_page(items: Sequence, size: int, max_bytes: int) -> int:
    """How many of `items` (at most `size`) fit in `max_bytes` of serialised messages; always >= 1
    when there are items (a single item is bounded far below a message by the field limits)."""
    total = 0
    for count, item in enumerate(items[:size]):
        total += item.ByteSize() + 8  # + tag and length prefix in the repeated field
        if total > max_bytes and count > 0:
            return count
    return min(len(items), size)


def _encode_token(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode()


def _decode_token(token: str) -> object:
    try:
        return json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgumentError(f"page_token {quoted(token)} is not a token this server returned",
                                   field="page_token") from None


def _page_size(page_size: int) -> int:
    if page_size < 0:
        raise InvalidArgumentError(f"page_size must be >= 0 (0 for the default {DEFAULT_PAGE_SIZE}), got {page_size}",
                                   field="page_size")
    return min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


class ArtifactUpload:
    """Bytes of one artifact arriving in chunks. `finish()` makes it visible; `abort()` (or any
    failure) leaves nothing behind."""

    def __init__(self, library: UrzaLibrary, artifact: KernelArtifact):
        self._library = library
        self.artifact = artifact
        self._writer = library.blobs.writer()
        self._finished = False

    @property
    def received_bytes(self) -> int:
        return self._writer.size

    def write(self, chunk: bytes) -> None:
        """Append one chunk (at most 1 MiB; never beyond the declared size)."""
        if len(chunk) > MAX_CHUNK_BYTES:
            self.abort()
            raise InvalidArgumentError(f"chunk must be at most {MAX_CHUNK_BYTES} bytes, got {len(chunk)}",
                                       field="chunk")
        if self._writer.size + len(chunk) > self.artifact.size_bytes:
            self.abort()
            raise InvalidArgumentError(
                f"upload exceeds metadata.size_bytes={self.artifact.size_bytes} "
                f"({self._writer.size + len(chunk)} bytes received)", field="metadata.size_bytes")
        self._writer.write(chunk)

    def finish(self) -> tuple[KernelArtifact, bool]:
        """Check size and SHA-256, store the blob durably, then publish the metadata row."""
        try:
            if self._writer.size != self.artifact.size_bytes:
                raise InvalidArgumentError(
                    f"upload ended after {self._writer.size} bytes but metadata.size_bytes declared "
                    f"{self.artifact.size_bytes}", field="metadata.size_bytes")
            if self._writer.sha256 != self.artifact.sha256:
                raise InvalidArgumentError(
                    f"the uploaded bytes hash to {self._writer.sha256}, but metadata.sha256 declared "
                    f"{self.artifact.sha256}", field="metadata.sha256")
            self._writer.commit()
        except BaseException:
            self.abort()
            raise
        self._finished = True
        return self._library._publish_artifact(self.artifact)

    def abort(self) -> None:
        """Drop the partial bytes."""
        self._writer.abort()

    def __enter__(self) -> ArtifactUpload:
        return self

    def __exit__(self, *exc_info) -> None:
        if not self._finished:
            self.abort()


class UrzaLibrary:
    """Blueprints and artifacts: metadata in a SQL database, bytes in a content-addressed store."""

    def __init__(self, data_dir: Path | str, database_url: str | None = None, *,
                 max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES,
                 metadata_cache_entries: int = DEFAULT_METADATA_CACHE_ENTRIES,
                 max_list_response_bytes: int = DEFAULT_MAX_LIST_RESPONSE_BYTES):
        if max_list_response_bytes < 1024:
            raise ValueError(f"max_list_response_bytes must be >= 1024, got {max_list_response_bytes}")
        self.max_list_response_bytes = max_list_response_bytes
        self.data_dir = Path(data_dir)
        self._cache: OrderedDict[str, KernelArtifact] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._cache_entries = metadata_cache_entries
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.database_url = database_url or md.sqlite_url(self.data_dir / "urza.db")
        self.engine = md.create_metadata_engine(self.database_url)
        self.blobs = BlobStore(self.data_dir / "blobs")
        self.max_artifact_bytes = max_artifact_bytes
        # Learned Tamiyo policies share the database and the blob store.
        self.policies = PolicyShelf(self)

    def close(self) -> None:
        """Release database connections."""
        self.engine.dispose()

    # -- blueprints ---------------------------------------------------------------------------

    def register_blueprint(self, spec: BlueprintSpec) -> tuple[BlueprintSpec, bool]:
        """Validate and store a blueprint. Returns (stored spec, created)."""
        validate_blueprint_spec(spec)
        stored = BlueprintSpec()
        stored.CopyFrom(spec)
        tags = _validate_tags(spec.tags, "blueprint.tags")
        digest = spec_sha256(stored)
        existing = self._find_blueprint(stored.blueprint_id, stored.version)
        if existing is not None:
            return self._same_blueprint(existing, stored, digest), False
        try:
            with self.engine.begin() as conn:
                conn.execute(md.blueprints.insert().values(
                    blueprint_id=stored.blueprint_id, version=stored.version, family=stored.family,
                    input_kind=stored.input_kind, spec=stored.SerializeToString(deterministic=True),
                    spec_sha256=digest, create_time=_now()))
                if tags:
                    conn.execute(md.blueprint_tags.insert(), [
                        {"blueprint_id": stored.blueprint_id, "version": stored.version, "tag": t}
                        for t in tags])
        except sa.exc.IntegrityError:
            # A concurrent registration of the same id+version won the race.
            existing = self._find_blueprint(stored.blueprint_id, stored.version)
            if existing is None:
                raise
            return self._same_blueprint(existing, stored, digest), False
        return stored, True

    def _same_blueprint(self, existing: sa.Row, spec: BlueprintSpec, digest: str) -> BlueprintSpec:
        if existing.spec_sha256 != digest:
            raise AlreadyExistsError(
                f"blueprint {quoted(spec.blueprint_id)} version {spec.version} is already registered with different "
                "content; register a new version instead", reason="BLUEPRINT_VERSION_EXISTS",
                metadata={"blueprint_id": spec.blueprint_id, "version": spec.version})
        return BlueprintSpec.FromString(existing.spec)

    def _find_blueprint(self, blueprint_id: str, version: int) -> sa.Row | None:
        query = sa.select(md.blueprints).where(md.blueprints.c.blueprint_id == blueprint_id)
        if version > 0:
            query = query.where(md.blueprints.c.version == version)
        else:
            query = query.order_by(md.blueprints.c.version.desc()).limit(1)
        with self.engine.connect() as conn:
            return conn.execute(query).first()

    def get_blueprint(self, blueprint_id: str, version: int = 0) -> BlueprintSpec:
        """A registered blueprint; version 0 means the latest."""
        if not blueprint_id:
            raise InvalidArgumentError("blueprint_id is required", field="blueprint_id")
        if version < 0:
            raise InvalidArgumentError(f"version must be >= 0 (0 for the latest), got {version}", field="version")
        row = self._find_blueprint(blueprint_id, version)
        if row is None:
            which = f"version {version}" if version else "any version"
            raise NotFoundError(f"blueprint {quoted(blueprint_id)} ({which}) is not registered",
                                reason="BLUEPRINT_NOT_FOUND", metadata={"blueprint_id": blueprint_id})
        return BlueprintSpec.FromString(row.spec)

    def list_blueprints(self, *, family: str = "", input_kind: int = 0, tags: Sequence[str] = (),
                        page_size: int = 0, page_token: str = "") -> tuple[list[BlueprintSpec], str]:
        """Blueprints matching every filter (input_kind also matches kind-agnostic blueprints),
        ordered by id and version; returns (page, next_page_token)."""
        _validate_enum(common_pb2.SeedInputKind, input_kind, "input_kind", allow_unspecified=True)
        size = _page_size(page_size)
        t = md.blueprints
        query = sa.select(t.c.spec, t.c.blueprint_id, t.c.version)
        if family:
            query = query.where(t.c.family == family)
        if input_kind:
            query = query.where(t.c.input_kind.in_([input_kind, common_pb2.SEED_INPUT_KIND_UNSPECIFIED]))
        for tag in _validate_tags(tags, "tags"):
            bt = md.blueprint_tags
            query = query.where(sa.exists().where(
                bt.c.blueprint_id == t.c.blueprint_id, bt.c.version == t.c.version, bt.c.tag == tag))
        if page_token:
            after = _decode_token(page_token)
            if not (isinstance(after, list) and len(after) == 2):
                raise InvalidArgumentError(f"page_token {quoted(page_token)} is not a token this server returned",
                                           field="page_token")
            query = query.where(sa.tuple_(t.c.blueprint_id, t.c.version) > sa.tuple_(after[0], after[1]))
        query = query.order_by(t.c.blueprint_id, t.c.version).limit(size + 1)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        specs = [BlueprintSpec.FromString(r.spec) for r in rows]
        fit = _fit_page(specs, size, self.max_list_response_bytes)
        page = rows[:fit]
        token = _encode_token([page[-1].blueprint_id, page[-1].version]) if len(rows) > fit else ""
        return specs[:fit], token

    # -- artifacts ----------------------------------------------------------------------------

    def _validate_artifact_fields(self, artifact: KernelArtifact, field: str) -> None:
        validate_kernel_id(artifact.kernel_id, f"{field}.kernel_id")
        if not artifact.blueprint_id:
            raise InvalidArgumentError(f"{field}.blueprint_id is required", field=f"{field}.blueprint_id")
        if artifact.blueprint_version < 1:
            raise InvalidArgumentError(f"{field}.blueprint_version must be >= 1, got {artifact.blueprint_version}",
                                       field=f"{field}.blueprint_version")
        validate_shape(artifact.input_shape.dims, f"{field}.input_shape.dims")
        _validate_enum(common_pb2.DeviceType, artifact.device, f"{field}.device")
        _validate_enum(common_pb2.DType, artifact.dtype, f"{field}.dtype")
        _validate_tags(artifact.tags, f"{field}.tags")
        _check_length(artifact.status_reason, MAX_STATUS_REASON_CHARS, f"{field}.status_reason")
        _check_length(artifact.format, MAX_FORMAT_CHARS, f"{field}.format")
        for name in ("parameter_count", "flops_per_sample"):
            if getattr(artifact, name) < 0:
                raise InvalidArgumentError(f"{field}.{name} must be >= 0", field=f"{field}.{name}")
        if self._find_blueprint(artifact.blueprint_id, artifact.blueprint_version) is None:
            raise NotFoundError(
                f"{field}: blueprint {quoted(artifact.blueprint_id)} version {artifact.blueprint_version} is not "
                "registered; register it before storing its artifacts", reason="BLUEPRINT_NOT_FOUND",
                metadata={"blueprint_id": artifact.blueprint_id, "field": f"{field}.blueprint_id"})

    def begin_upload(self, artifact: KernelArtifact, *, caller: str = "", may_certify: bool = True
                     ) -> ArtifactUpload:
        """Validate upload metadata (sha256 and size_bytes required) and start receiving bytes.

        A VALIDATED artifact (the default status) certifies the bytes as a checked compile result,
        so only a caller that `may_certify` (the compiler role) may create one; PermissionDeniedError
        (reason COMPILER_ROLE_REQUIRED) otherwise. `caller` names the principal in that error.
        """
        self._validate_artifact_fields(artifact, "metadata")
        if not is_sha256_hex(artifact.sha256):
            raise InvalidArgumentError(
                f"metadata.sha256 must be the 64 lowercase hex characters of the bytes' SHA-256, "
                f"got {quoted(artifact.sha256)}", field="metadata.sha256")
        if not 0 <= artifact.size_bytes <= self.max_artifact_bytes:
            raise InvalidArgumentError(
                f"metadata.size_bytes must be in 0..{self.max_artifact_bytes}, got {artifact.size_bytes}",
                field="metadata.size_bytes")
        status = artifact.status or common_pb2.ARTIFACT_STATUS_VALIDATED
        _validate_enum(common_pb2.ArtifactStatus, status, "metadata.status")
        if status == common_pb2.ARTIFACT_STATUS_VALIDATED and not may_certify:
            raise PermissionDeniedError(
                f"principal {quoted(caller or 'unknown')} may not create VALIDATED artifacts (metadata.status "
                "VALIDATED, the default); only the compiler role (Tezzeret's credentials) may. Upload it as "
                "ARTIFACT_STATUS_PENDING or INVALID, or have Tezzeret compile it",
                reason="COMPILER_ROLE_REQUIRED", metadata={"principal": caller, "field": "metadata.status"})
        existing = self._find_artifact(artifact.kernel_id)
        if existing is not None and existing.status != common_pb2.ARTIFACT_STATUS_PENDING \
                and existing.sha256 != artifact.sha256:
            raise self._conflict(artifact.kernel_id)
        stored = KernelArtifact()
        stored.CopyFrom(artifact)
        stored.status = status
        stored.ClearField("create_time")
        return ArtifactUpload(self, stored)

    def upload_bytes(self, artifact: KernelArtifact, data: bytes) -> tuple[KernelArtifact, bool]:
        """Store an artifact and its bytes in one call (sha256/size_bytes filled in when empty)."""
        full = KernelArtifact()
        full.CopyFrom(artifact)
        full.sha256 = full.sha256 or hashlib.sha256(data).hexdigest()
        full.size_bytes = full.size_bytes or len(data)
        with self.begin_upload(full) as upload:
            for start in range(0, len(data), MAX_CHUNK_BYTES):
                upload.write(data[start:start + MAX_CHUNK_BYTES])
            return upload.finish()

    @staticmethod
    def _conflict(kernel_id: str) -> AlreadyExistsError:
        return AlreadyExistsError(
            f"artifact {quoted(kernel_id)} already exists with other content; artifacts are immutable",
            reason="ARTIFACT_EXISTS", metadata={"kernel_id": kernel_id})

    def record_artifact(self, artifact: KernelArtifact) -> KernelArtifact:
        """Record an artifact that has no bytes: INVALID (with its reason) or PENDING."""
        self._validate_artifact_fields(artifact, "artifact")
        if artifact.status not in (common_pb2.ARTIFACT_STATUS_INVALID, common_pb2.ARTIFACT_STATUS_PENDING):
            raise InvalidArgumentError(
                "artifact.status must be ARTIFACT_STATUS_INVALID or ARTIFACT_STATUS_PENDING for a record without "
                f"bytes (upload VALIDATED artifacts with UploadArtifact), got "
                f"{_enum_name(common_pb2.ArtifactStatus, artifact.status)}", field="artifact.status")
        if artifact.status == common_pb2.ARTIFACT_STATUS_INVALID and not artifact.status_reason:
            raise InvalidArgumentError("artifact.status_reason must say why the artifact is INVALID",
                                       field="artifact.status_reason")
        if artifact.sha256 or artifact.size_bytes:
            raise InvalidArgumentError("artifact.sha256 and size_bytes must be empty for a record without bytes",
                                       field="artifact.sha256")
        stored = KernelArtifact()
        stored.CopyFrom(artifact)
        stored.ClearField("create_time")
        result, _ = self._publish_artifact(stored)
        return result

    def _publish_artifact(self, artifact: KernelArtifact) -> tuple[KernelArtifact, bool]:
        """Insert the metadata row (or complete a PENDING one); idempotent for identical content."""
        values = dict(
            kernel_id=artifact.kernel_id, blueprint_id=artifact.blueprint_id,
            blueprint_version=artifact.blueprint_version, input_shape=shape_text(artifact.input_shape.dims),
            device=artifact.device, dtype=artifact.dtype, status=artifact.status,
            status_reason=artifact.status_reason, sha256=artifact.sha256, size_bytes=artifact.size_bytes,
            parameter_count=artifact.parameter_count, flops_per_sample=artifact.flops_per_sample,
            latency_us=artifact.latency_us, format=artifact.format,
            preservation_error=artifact.preservation_error, create_time=_now())
        tags = _validate_tags(artifact.tags, "artifact.tags")
        for _attempt in range(3):
            existing = self._find_artifact(artifact.kernel_id)
            try:
                with self.engine.begin() as conn:
                    if existing is None:
                        conn.execute(md.artifacts.insert().values(**values))
                    elif existing.status == common_pb2.ARTIFACT_STATUS_PENDING and \
                            artifact.status != common_pb2.ARTIFACT_STATUS_PENDING:
                        updated = conn.execute(md.artifacts.update().where(
                            md.artifacts.c.kernel_id == artifact.kernel_id,
                            md.artifacts.c.status == common_pb2.ARTIFACT_STATUS_PENDING).values(**values))
                        if updated.rowcount != 1:
                            continue  # someone completed it first; compare with theirs
                        conn.execute(md.artifact_tags.delete().where(
                            md.artifact_tags.c.kernel_id == artifact.kernel_id))
                    else:
                        same = (existing.sha256 == artifact.sha256 and existing.status == artifact.status
                                and existing.status_reason == artifact.status_reason)
                        if not same:
                            raise self._conflict(artifact.kernel_id)
                        return self.get_artifact(artifact.kernel_id), False
                    if tags:
                        conn.execute(md.artifact_tags.insert(),
                                     [{"kernel_id": artifact.kernel_id, "tag": t} for t in tags])
            except sa.exc.IntegrityError:
                continue  # a concurrent insert of the same kernel id; re-read and compare
            return self.get_artifact(artifact.kernel_id), True
        raise self._conflict(artifact.kernel_id)

    def _find_artifact(self, kernel_id: str) -> sa.Row | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(md.artifacts).where(md.artifacts.c.kernel_id == kernel_id)).first()

    def _artifact_from_row(self, row: sa.Row, tags: Iterable[str]) -> KernelArtifact:
        artifact = KernelArtifact(
            kernel_id=row.kernel_id, blueprint_id=row.blueprint_id, blueprint_version=row.blueprint_version,
            input_shape=common_pb2.TensorShape(dims=[int(d) for d in row.input_shape.split(",")]),
            device=row.device, dtype=row.dtype, status=row.status, status_reason=row.status_reason,
            sha256=row.sha256, size_bytes=row.size_bytes, parameter_count=row.parameter_count,
            flops_per_sample=row.flops_per_sample, latency_us=row.latency_us, format=row.format,
            tags=sorted(tags), preservation_error=row.preservation_error)
        _set_time(artifact.create_time, row.create_time)
        return artifact

    def cached_artifact(self, kernel_id: str) -> KernelArtifact | None:
        """A copy of a VALIDATED/INVALID artifact's metadata if it is in memory; no I/O, so a server
        may call it on its event loop. None on a miss (then call get_artifact)."""
        with self._cache_lock:
            artifact = self._cache.get(kernel_id)
            if artifact is None:
                return None
            self._cache.move_to_end(kernel_id)
        copy = KernelArtifact()
        copy.CopyFrom(artifact)
        return copy

    def _remember(self, artifact: KernelArtifact) -> None:
        if artifact.status not in _FINAL_STATUSES or self._cache_entries <= 0:
            return  # PENDING may still change
        stored = KernelArtifact()
        stored.CopyFrom(artifact)
        with self._cache_lock:
            self._cache[artifact.kernel_id] = stored
            self._cache.move_to_end(artifact.kernel_id)
            while len(self._cache) > self._cache_entries:
                self._cache.popitem(last=False)

    def get_artifact(self, kernel_id: str) -> KernelArtifact:
        """Metadata of one artifact; NotFoundError when unknown."""
        cached = self.cached_artifact(kernel_id)
        if cached is not None:
            return cached
        validate_kernel_id(kernel_id)
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(md.artifacts).where(md.artifacts.c.kernel_id == kernel_id)).first()
            if row is None:
                raise NotFoundError(f"artifact {quoted(kernel_id)} not found", reason="ARTIFACT_NOT_FOUND",
                                    metadata={"kernel_id": kernel_id})
            tags = conn.execute(sa.select(md.artifact_tags.c.tag).where(
                md.artifact_tags.c.kernel_id == kernel_id)).scalars().all()
        artifact = self._artifact_from_row(row, tags)
        self._remember(artifact)
        return artifact

    def find_artifact(self, kernel_id: str) -> KernelArtifact | None:
        """Like get_artifact, None when unknown."""
        try:
            return self.get_artifact(kernel_id)
        except NotFoundError:
            return None

    def open_download(self, kernel_id: str, chunk_size: int = 0) -> tuple[KernelArtifact, Iterator[bytes]]:
        """Metadata and a verified chunk iterator over the artifact's bytes (chunks <= 1 MiB)."""
        if chunk_size < 0:
            raise InvalidArgumentError(f"chunk_size must be >= 0 (0 for the default), got {chunk_size}",
                                       field="chunk_size")
        size = min(chunk_size or MAX_CHUNK_BYTES, MAX_CHUNK_BYTES)
        artifact = self.get_artifact(kernel_id)
        if artifact.status == common_pb2.ARTIFACT_STATUS_INVALID:
            # The compiler rejected it: its bytes (if any were stored) must never reach a model.
            raise FailedPreconditionError(
                f"artifact {quoted(kernel_id)} is INVALID ({artifact.status_reason or 'no reason'}); only VALIDATED "
                "artifacts are served", reason="ARTIFACT_INVALID", metadata={"kernel_id": kernel_id})
        if not artifact.sha256:
            raise FailedPreconditionError(
                f"artifact {quoted(kernel_id)} has no bytes (status "
                f"{_enum_name(common_pb2.ArtifactStatus, artifact.status)}: {artifact.status_reason or 'no reason'})",
                reason="ARTIFACT_HAS_NO_BYTES", metadata={"kernel_id": kernel_id})
        return artifact, self.blobs.read_chunks(artifact.sha256, size)

    def read_artifact_bytes(self, kernel_id: str) -> bytes:
        """All bytes of an artifact, verified."""
        _artifact, chunks = self.open_download(kernel_id)
        return b"".join(chunks)

    def query_artifacts(self, *, blueprint_id: str = "", status: int = 0, input_shape: Sequence[int] = (),
                        device: int = 0, dtype: int = 0, tags: Sequence[str] = (), page_size: int = 0,
                        page_token: str = "") -> tuple[list[KernelArtifact], str]:
        """Artifacts matching every given filter, ordered by kernel id; (page, next_page_token)."""
        size = _page_size(page_size)
        _validate_enum(common_pb2.ArtifactStatus, status, "status", allow_unspecified=True)
        _validate_enum(common_pb2.DeviceType, device, "device", allow_unspecified=True)
        _validate_enum(common_pb2.DType, dtype, "dtype", allow_unspecified=True)
        t = md.artifacts
        query = sa.select(t)
        if blueprint_id:
            query = query.where(t.c.blueprint_id == blueprint_id)
        if status:
            query = query.where(t.c.status == status)
        if input_shape:
            validate_shape(input_shape, "input_shape.dims")
            query = query.where(t.c.input_shape == shape_text(input_shape))
        if device:
            query = query.where(t.c.device == device)
        if dtype:
            query = query.where(t.c.dtype == dtype)
        for tag in _validate_tags(tags, "tags"):
            at = md.artifact_tags
            query = query.where(sa.exists().where(at.c.kernel_id == t.c.kernel_id, at.c.tag == tag))
        if page_token:
            after = _decode_token(page_token)
            if not isinstance(after, str):
                raise InvalidArgumentError(f"page_token {quoted(page_token)} is not a token this server returned",
                                           field="page_token")
            query = query.where(t.c.kernel_id > after)
        query = query.order_by(t.c.kernel_id).limit(size + 1)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()[: size + 1]
            page = rows[:size]
            tags_by_id: dict[str, list[str]] = {r.kernel_id: [] for r in page}
            if page:
                for kid, tag in conn.execute(sa.select(md.artifact_tags.c.kernel_id, md.artifact_tags.c.tag).where(
                        md.artifact_tags.c.kernel_id.in_(list(tags_by_id)))):
                    tags_by_id[kid].append(tag)
        artifacts = [self._artifact_from_row(r, tags_by_id[r.kernel_id]) for r in page]
        fit = _fit_page(artifacts, size, self.max_list_response_bytes)
        more = len(rows) > fit
        artifacts = artifacts[:fit]
        token = _encode_token(artifacts[-1].kernel_id) if more else ""
        return artifacts, token

    def stats(self) -> dict[str, object]:
        """Counts for monitoring: blueprints, and artifacts and their bytes by status name."""
        t = md.artifacts
        query = sa.select(t.c.status, sa.func.count(), sa.func.coalesce(sa.func.sum(t.c.size_bytes), 0)).group_by(t.c.status)
        with self.engine.connect() as conn:
            blueprints = conn.execute(sa.select(sa.func.count()).select_from(md.blueprints)).scalar_one()
            rows = conn.execute(query).all()
        names = {status: _enum_name(common_pb2.ArtifactStatus, status) for status, _, _ in rows}
        return {"blueprints": int(blueprints),
                "artifacts": {names[status]: int(n) for status, n, _ in rows},
                "artifact_bytes": {names[status]: int(size) for status, _, size in rows}}
