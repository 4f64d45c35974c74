"""PolicyShelf on both metadata backends (SQLite file and a real PostgreSQL): versions assigned in
order, the same policy again not a new version, bad input named, NOT_FOUND naming what exists,
corrupted weights never served."""

from __future__ import annotations

import hashlib
import json
import threading

import pytest

from esper.errors import DataLossError, InvalidArgumentError, NotFoundError
from esper.v1 import urza_pb2
from tests.urza.test_urza_library import library  # noqa: F401 - the two-backend fixture


def record(name: str, weights: bytes, **manifest) -> urza_pb2.PolicyRecord:
    digest = hashlib.sha256(weights).hexdigest()
    text = json.dumps({"feature_schema": "tamiyo-graph/2", "version": "v", "weights_sha256": digest, **manifest})
    return urza_pb2.PolicyRecord(name=name, manifest_json=text, weights_sha256=digest)


def test_versions_idempotence_and_lookup(library):  # noqa: F811
    shelf = library.policies
    a, created = shelf.publish(record("gnn", b"weights-a", version="gnn-a"), b"weights-a")
    assert (a.version, created, a.policy_version, a.feature_schema, a.size_bytes) == (1, True, "gnn-a",
                                                                                     "tamiyo-graph/2", 9)
    assert shelf.publish(record("gnn", b"weights-a", version="gnn-a"), b"weights-a")[0].version == 1
    b, created = shelf.publish(record("gnn", b"weights-b", version="gnn-b"), b"weights-b")
    assert (b.version, created) == (2, True)
    assert shelf.publish(record("other", b"weights-a"), b"weights-a")[0].version == 1  # versions per name
    newest, weights = shelf.get("gnn")
    assert (newest.version, weights) == (2, b"weights-b")
    first, weights = shelf.get("gnn", 1)
    assert (first.policy_version, weights) == ("gnn-a", b"weights-a")
    meta, weights = shelf.get("gnn", 2, metadata_only=True)
    assert (meta.version, weights) == (2, b"")
    with pytest.raises(NotFoundError, match="policy 'gnn' version 3 not found; Urza has versions 1..2") as err:
        shelf.get("gnn", 3)
    assert err.value.reason == "POLICY_NOT_FOUND"


def test_concurrent_publishers_get_distinct_versions(library):  # noqa: F811
    shelf = library.policies
    got: list[int] = []
    errors: list[BaseException] = []

    def publish(i: int) -> None:
        try:
            data = f"weights-{i}".encode()
            got.append(shelf.publish(record("race", data), data)[0].version)
        except BaseException as exc:  # collected and asserted on below
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(got) == [1, 2, 3, 4]


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda r, w: (urza_pb2.PolicyRecord(name="Gnn!", manifest_json=r.manifest_json,
                                         weights_sha256=r.weights_sha256), w), "policy.name"),
    (lambda r, w: (r, b"other bytes"), "do not hash to policy.weights_sha256"),
    (lambda r, w: (r, b""), "weights has 0 bytes"),
    (lambda r, w: (urza_pb2.PolicyRecord(name="gnn", manifest_json="[1]", weights_sha256=r.weights_sha256), w),
     "is a JSON list; expected an object"),
    (lambda r, w: (urza_pb2.PolicyRecord(name="gnn", manifest_json="{", weights_sha256=r.weights_sha256), w),
     "is not JSON"),
    (lambda r, w: (record("gnn", w, weights_sha256="0" * 64), w), "differs from policy.weights_sha256"),
])
def test_bad_publications_are_refused_naming_the_field(library, mutate, match):  # noqa: F811
    good = b"weights"
    rec, weights = mutate(record("gnn", good), good)
    with pytest.raises(InvalidArgumentError, match=match):
        library.policies.publish(rec, weights)
    with pytest.raises(NotFoundError):
        library.policies.get("gnn")


def test_corrupted_weights_are_never_served(library):  # noqa: F811
    stored, _ = library.policies.publish(record("gnn", b"weights-x"), b"weights-x")
    library.blobs.path_for(stored.weights_sha256).write_bytes(b"weights-y")
    with pytest.raises(DataLossError, match="corrupted"):
        library.policies.get("gnn", 1)
    assert library.policies.get("gnn", 1, metadata_only=True)[0].version == 1
