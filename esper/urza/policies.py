"""Learned Tamiyo policies in Urza: a manifest and safetensors weights under a name and a version.

`PolicyShelf(library)` shares the library's database and blob store. `publish` stores a policy
as the next version of its name (1, 2, ...) and returns the version already stored when the same
manifest and weights are published again; `get` returns one version (0: the newest) with its
weights, verified against their SHA-256 on every read. What a policy *means* (feature schema,
architecture) is Tamiyo's business (`esper.tamiyo.policy_store`); Urza checks only that the
manifest is a JSON object naming the weights' checksum, so a reader can verify what it got.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re

import sqlalchemy as sa

from esper.errors import InvalidArgumentError, NotFoundError, quoted
from esper.urza import metadata as md
from esper.urza.blobs import is_sha256_hex
from esper.v1 import urza_pb2

PolicyRecord = urza_pb2.PolicyRecord

# One gRPC message carries the weights (the default limit is 4 MiB; the GNN's are ~350 KB).
MAX_POLICY_WEIGHTS_BYTES = 3 * 1024 * 1024
MAX_MANIFEST_CHARS = 256 * 1024
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


def validate_policy_name(name: str, field: str = "policy.name") -> None:
    if not _NAME.match(name):
        raise InvalidArgumentError(f"{field} {quoted(name)} is not a policy name; expected 1-64 characters of "
                                   "lowercase letters, digits, _ and -, starting with a letter, e.g. 'gnn'",
                                   field=field)


def _manifest_fields(text: str, weights_sha256: str) -> tuple[str, str]:
    """(feature_schema, policy version) of a manifest; InvalidArgumentError naming what is wrong."""
    field = "policy.manifest_json"
    if len(text) > MAX_MANIFEST_CHARS:
        raise InvalidArgumentError(f"{field} has {len(text)} characters; expected at most {MAX_MANIFEST_CHARS}",
                                   field=field)
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise InvalidArgumentError(f"{field} is not JSON ({exc}); expected the policy's manifest.json",
                                   field=field) from None
    if not isinstance(manifest, dict):
        raise InvalidArgumentError(f"{field} is a JSON {type(manifest).__name__}; expected an object", field=field)
    if manifest.get("weights_sha256") != weights_sha256:
        raise InvalidArgumentError(f"{field}: weights_sha256 {manifest.get('weights_sha256')!r} differs from "
                                   f"policy.weights_sha256 {weights_sha256!r}; expected the manifest written with "
                                   "these weights", field=field)
    schema, version = manifest.get("feature_schema", ""), manifest.get("version", "")
    if not isinstance(schema, str) or not isinstance(version, str) or len(schema) > 128 or len(version) > 200:
        raise InvalidArgumentError(f"{field}: feature_schema and version must be strings (at most 128 and 200 "
                                   "characters)", field=field)
    return schema, version


def _record(row: sa.Row) -> PolicyRecord:
    record = PolicyRecord(name=row.name, version=row.version, manifest_json=row.manifest_json,
                          weights_sha256=row.weights_sha256, size_bytes=row.size_bytes,
                          feature_schema=row.feature_schema, policy_version=row.policy_version)
    created = row.create_time if row.create_time.tzinfo else row.create_time.replace(tzinfo=dt.UTC)
    record.create_time.FromDatetime(created)
    return record


class PolicyShelf:
    """Policies of one `UrzaLibrary` (see the module docstring). Blocking; thread-safe."""

    def __init__(self, library) -> None:
        self.engine = library.engine
        self.blobs = library.blobs

    def publish(self, record: PolicyRecord, weights: bytes) -> tuple[PolicyRecord, bool]:
        """Stores `weights` and `record.manifest_json` as the next version of `record.name`;
        (stored record, created). Version and the fields Urza sets are ignored on input."""
        validate_policy_name(record.name)
        if not is_sha256_hex(record.weights_sha256):
            raise InvalidArgumentError(f"policy.weights_sha256 {quoted(record.weights_sha256)} is not 64 lowercase "
                                       "hex characters", field="policy.weights_sha256")
        if not weights or len(weights) > MAX_POLICY_WEIGHTS_BYTES:
            raise InvalidArgumentError(f"weights has {len(weights)} bytes; expected 1..{MAX_POLICY_WEIGHTS_BYTES}",
                                       field="weights")
        if hashlib.sha256(weights).hexdigest() != record.weights_sha256:
            raise InvalidArgumentError("weights do not hash to policy.weights_sha256; expected the bytes the "
                                       "checksum was computed on", field="weights")
        schema, policy_version = _manifest_fields(record.manifest_json, record.weights_sha256)
        content = hashlib.sha256(record.manifest_json.encode() + b"\0" + record.weights_sha256.encode()).hexdigest()
        self.blobs.put(weights)
        t = md.policies
        for _attempt in range(5):  # concurrent publishers of one name race for the next version
            with self.engine.begin() as conn:
                same = conn.execute(sa.select(t).where(t.c.name == record.name, t.c.content_sha256 == content)
                                    .order_by(t.c.version)).first()
                if same is not None:
                    return _record(same), False
                newest = conn.execute(sa.select(sa.func.max(t.c.version)).where(t.c.name == record.name)).scalar()
                try:
                    conn.execute(t.insert().values(
                        name=record.name, version=(newest or 0) + 1, manifest_json=record.manifest_json,
                        content_sha256=content, weights_sha256=record.weights_sha256, size_bytes=len(weights),
                        feature_schema=schema, policy_version=policy_version, create_time=dt.datetime.now(dt.UTC)))
                except sa.exc.IntegrityError:
                    continue
            return self.get(record.name, (newest or 0) + 1, metadata_only=True)[0], True
        raise InvalidArgumentError(f"policy {quoted(record.name)}: too many concurrent publishers; retry",
                                   field="policy.name")

    def get(self, name: str, version: int = 0, *, metadata_only: bool = False) -> tuple[PolicyRecord, bytes]:
        """(record, verified weights) of `name` at `version` (0: the newest); NotFoundError naming
        the versions that exist when there is no such version."""
        validate_policy_name(name, "name")
        if version < 0:
            raise InvalidArgumentError(f"version must be >= 0 (0 for the newest), got {version}", field="version")
        t = md.policies
        with self.engine.connect() as conn:
            query = sa.select(t).where(t.c.name == name)
            query = query.where(t.c.version == version) if version else query.order_by(t.c.version.desc())
            row = conn.execute(query.limit(1)).first()
            if row is None:
                newest = conn.execute(sa.select(sa.func.max(t.c.version)).where(t.c.name == name)).scalar()
        if row is None:
            have = f"versions 1..{newest}" if newest else "no version"
            raise NotFoundError(f"policy {quoted(name)}{f' version {version}' if version else ''} not found; Urza has "
                                f"{have} of it", reason="POLICY_NOT_FOUND",
                                metadata={"name": name, "version": str(version)})
        record = _record(row)
        return record, b"" if metadata_only else self.blobs.read_bytes(record.weights_sha256)
