"""Learned policies in Urza by version, against a real Urza server process on a loopback port:
publish and load round trip, a wrong version refused with NOT_FOUND, a policy of another feature
schema refused, corrupted weights refused, and esper-tamiyo following the newest version."""

from __future__ import annotations

import json
import sys
import uuid

import grpc
import pytest

from esper.serving import ServerProcess, error_info_from, open_sync_channel
from esper.tamiyo.gnn_policy import GNNPolicy
from esper.tamiyo.policy import RailsConfig
from esper.tamiyo.policy_source import load_policy_ref, parse_urza_ref, publish_to_urza
from esper.tamiyo.policy_store import MANIFEST, PolicyLoadError, load_policy
from esper.urza.blobs import BlobStore
from esper.v1 import common_pb2, tamiyo_pb2, tamiyo_pb2_grpc, urza_pb2, urza_pb2_grpc
from tests.tamiyo.policy_helpers import always_grow_gnn, chain_graph, untrained_gnn, write_policy
from tests.tamiyo.test_policy_server import wait_for_version

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def urza(tmp_path_factory):
    root = tmp_path_factory.mktemp("urza")
    proc = ServerProcess([sys.executable, "-m", "services.urza", "--port", "0", "--data-dir", str(root / "data")],
                         stderr_path=root / f"urza-{uuid.uuid4().hex[:6]}.log")
    proc.start()
    yield proc.address, root / "data"
    assert proc.stop() == 0


def test_publish_and_load_by_version_round_trip(urza, tmp_path):
    address, _ = urza
    name = f"rt-{uuid.uuid4().hex[:6]}"
    write_policy(tmp_path / "a", untrained_gnn(seed=1), version="gnn-a")
    write_policy(tmp_path / "b", always_grow_gnn(), version="gnn-b")
    first, created = publish_to_urza(tmp_path / "a", address, name)
    assert (first.version, created, first.policy_version, first.feature_schema) == (1, True, "gnn-a",
                                                                                     "tamiyo-graph/3")
    again, created = publish_to_urza(tmp_path / "a", address, name)
    assert (again.version, created) == (1, False)  # the same policy again is not a new version
    second, created = publish_to_urza(tmp_path / "b", address, name)
    assert (second.version, created) == (2, True)

    v1 = load_policy_ref(f"urza://{address}/{name}@1")
    assert v1.version == "gnn-a" and v1.source == f"urza://{address}/{name}@1"
    newest = load_policy_ref(f"urza://{address}/{name}")
    assert newest.version == "gnn-b" and newest.source.endswith(f"/{name}@2")
    # Same weights, same decisions as the directory it was published from.
    rails = RailsConfig(parameter_budget=2.0, compute_budget=2.0)
    from_urza = GNNPolicy(v1, rails).decide(chain_graph())[0]
    from_dir = GNNPolicy(load_policy(tmp_path / "a"), rails).decide(chain_graph())[0]
    assert (from_urza.action, from_urza.layer_name, from_urza.confidence) == (
        from_dir.action, from_dir.layer_name, from_dir.confidence)


def test_wrong_version_is_not_found_with_the_versions_there_are(urza, tmp_path):
    address, _ = urza
    name = f"nf-{uuid.uuid4().hex[:6]}"
    write_policy(tmp_path / "a", untrained_gnn(), version="gnn-a")
    publish_to_urza(tmp_path / "a", address, name)
    with pytest.raises(PolicyLoadError, match=rf"policy '{name}' version 7 not found; Urza has versions 1..1"):
        load_policy_ref(f"urza://{address}/{name}@7")
    with pytest.raises(PolicyLoadError, match="not found; Urza has no version of it"):
        load_policy_ref(f"urza://{address}/absent")
    with open_sync_channel(address) as channel:
        stub = urza_pb2_grpc.UrzaServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetPolicy(urza_pb2.GetPolicyRequest(name=name, version=7), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_info_from(err.value).reason == "POLICY_NOT_FOUND"
        with pytest.raises(grpc.RpcError) as err:
            stub.PublishPolicy(urza_pb2.PublishPolicyRequest(policy=urza_pb2.PolicyRecord(name="Bad Name")), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "policy.name" in err.value.details()
    for bad in ("urza://host/", "urza://h:1/gnn@0", "urza://h:1/gnn@x"):
        with pytest.raises(PolicyLoadError, match="expected urza://HOST:PORT/NAME"):
            parse_urza_ref(bad)


def test_a_policy_of_another_feature_schema_is_refused(urza, tmp_path):
    address, _ = urza
    name = f"schema-{uuid.uuid4().hex[:6]}"
    write_policy(tmp_path / "old", untrained_gnn(), version="gnn-old")
    manifest = json.loads((tmp_path / "old" / MANIFEST).read_text())
    manifest["feature_schema"] = "tamiyo-graph/1"
    weights = (tmp_path / "old" / manifest["weights_file"]).read_bytes()
    from esper.clients.urza import UrzaClient

    with UrzaClient(address) as client:
        record, _ = client.publish_policy(name, json.dumps(manifest), weights)
    assert record.feature_schema == "tamiyo-graph/1"
    with pytest.raises(PolicyLoadError, match=r"feature schema 'tamiyo-graph/1'; this Tamiyo builds 'tamiyo-graph/3'"):
        load_policy_ref(f"urza://{address}/{name}@{record.version}")


def test_corrupted_weights_in_urza_are_refused(urza, tmp_path):
    address, data_dir = urza
    name = f"bad-{uuid.uuid4().hex[:6]}"
    # Its own weights (seed 42, hidden 12) so no other test shares the blob.
    write_policy(tmp_path / "a", untrained_gnn(seed=42, hidden=12), version="gnn-corrupt")
    record, _ = publish_to_urza(tmp_path / "a", address, name)
    path = BlobStore(data_dir / "blobs").path_for(record.weights_sha256)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(PolicyLoadError, match="DataLossError"):
        load_policy_ref(f"urza://{address}/{name}@1")


def test_tamiyo_serves_from_urza_and_follows_the_newest_version(urza, tmp_path):
    address, _ = urza
    name = f"serve-{uuid.uuid4().hex[:6]}"
    write_policy(tmp_path / "a", untrained_gnn(seed=0), version="gnn-u1")
    publish_to_urza(tmp_path / "a", address, name)
    ref = f"urza://{address}/{name}"
    proc = ServerProcess([sys.executable, "-m", "services.tamiyo", "--port", "0", "--replay-dir",
                          str(tmp_path / "replay"), "--policy", ref, "--policy-poll-s", "0.2"],
                         stderr_path=tmp_path / "tamiyo.log")
    proc.start()
    try:
        with open_sync_channel(proc.address) as channel:
            stub = tamiyo_pb2_grpc.TamiyoServiceStub(channel)
            info = stub.GetPolicyInfo(tamiyo_pb2.GetPolicyInfoRequest(), timeout=10)
            assert (info.policy_version, info.policy_source) == ("gnn-u1", f"{ref}@1")
            write_policy(tmp_path / "b", always_grow_gnn(), version="gnn-u2")
            publish_to_urza(tmp_path / "b", address, name)
            info = wait_for_version(stub, "gnn-u2")
            assert (info.policy_version, info.policy_swaps, info.policy_source) == ("gnn-u2", 1, f"{ref}@2")
            reply = stub.Decide(tamiyo_pb2.DecideRequest(graph=chain_graph(run_id="r", epoch=5)), timeout=30)
            assert reply.decisions[0].action == common_pb2.DECISION_ACTION_GERMINATE
    finally:
        assert proc.stop() == 0
    # A version that is not there stops the server at start, naming the versions there are.
    bad = ServerProcess([sys.executable, "-m", "services.tamiyo", "--port", "0", "--replay-dir",
                         str(tmp_path / "r2"), "--policy", f"{ref}@9"], stderr_path=tmp_path / "bad.log")
    with pytest.raises(Exception, match="exited with code 2"):
        bad.start()
    assert f"policy '{name}' version 9 not found; Urza has versions 1..2" in (tmp_path / "bad.log").read_text()


def test_train_cli_publishes_to_urza(urza, tmp_path, capsys):
    from esper.tamiyo.train_cli import main as train_main
    from tests.tamiyo.test_offline import logged_data, write

    address, _ = urza
    name = f"cli-{uuid.uuid4().hex[:6]}"
    write(tmp_path / "replay", logged_data(runs=4))
    assert train_main(["--replay", str(tmp_path / "replay"), "--out", str(tmp_path / "p"), "--epochs", "1",
                       "--hidden", "8", "--layers", "2", "--progress", "none", "--version", "gnn-cli",
                       "--publish-urza", address, "--publish-name", name]) == 0
    assert f"published urza://{address}/{name}@1 (gnn-cli)" in capsys.readouterr().out
    assert load_policy_ref(f"urza://{address}/{name}@1").version == "gnn-cli"
    # An Urza that is not there: a clear error, the policy directory is still written.
    assert train_main(["--replay", str(tmp_path / "replay"), "--out", str(tmp_path / "q"), "--epochs", "1",
                       "--hidden", "8", "--layers", "2", "--progress", "none", "--publish-urza", "127.0.0.1:1"]) == 1
    assert "--publish-urza 127.0.0.1:1" in capsys.readouterr().err and (tmp_path / "q" / MANIFEST).is_file()
