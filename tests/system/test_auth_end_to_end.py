"""services.auth_token end to end: a services.mode=remote run against real servers that all require
a token completes its adaptation cycle, the Tolaria server it starts requires the token too, and a
call without the token gets UNAUTHENTICATED everywhere."""

from __future__ import annotations

import json

import grpc
import pytest

from esper.local_stack import LocalStack
from esper.serving import ChannelConfig, open_sync_channel
from esper.v1 import (
    oona_pb2,
    oona_pb2_grpc,
    tamiyo_pb2,
    tamiyo_pb2_grpc,
    tezzeret_pb2,
    tezzeret_pb2_grpc,
    tolaria_pb2,
    tolaria_pb2_grpc,
    urza_pb2,
    urza_pb2_grpc,
)
from tests.system.helpers import DEV, TrainProcess, read_jsonl

pytestmark = pytest.mark.integration

TOKEN = "s3cret-run-token"
# One cheap call per service: (stub class, method name, request).
PROBES = {
    "urza": (urza_pb2_grpc.UrzaServiceStub, "QueryArtifacts", urza_pb2.QueryArtifactsRequest()),
    "tezzeret": (tezzeret_pb2_grpc.TezzeretServiceStub, "GetCompileJob",
                 tezzeret_pb2.GetCompileJobRequest(job_id="none")),
    "oona": (oona_pb2_grpc.OonaServiceStub, "ListTopics", oona_pb2.ListTopicsRequest()),
    "tamiyo": (tamiyo_pb2_grpc.TamiyoServiceStub, "GetPolicyInfo", tamiyo_pb2.GetPolicyInfoRequest()),
}


def _code(address: str, token: str | None, stub_cls, method: str, request) -> grpc.StatusCode:
    with open_sync_channel(ChannelConfig(address, auth_token=token)) as channel:
        try:
            getattr(stub_cls(channel), method)(request, timeout=10)
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def test_remote_run_with_token_everywhere(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_args = ["--auth-token-file", str(token_file)]
    with LocalStack(["urza", "oona", "tezzeret", "tamiyo"], state_dir=tmp_path / "stack",
                    extra_args={name: list(token_args) for name in ("urza", "oona", "tezzeret", "tamiyo")}) as stack:
        for name, (stub_cls, method, request) in PROBES.items():
            assert _code(stack.addresses[name], None, stub_cls, method, request) == grpc.StatusCode.UNAUTHENTICATED
            assert _code(stack.addresses[name], "wrong", stub_cls, method, request) == grpc.StatusCode.UNAUTHENTICATED

        run_dir = tmp_path / "run"
        addresses = [f"services.addresses.{n}={a}" for n, a in stack.addresses.items()]
        train = TrainProcess(run_dir, "--config", DEV, "train.epochs=30", "logging.tensorboard=false",
                             "logging.timeline_plot=false", f"services.auth_token_file={token_file}",
                             *addresses, mode="remote")
        try:
            tolaria = train.tolaria_address()
            probe = (tolaria_pb2_grpc.TolariaServiceStub, "GetRunStatus", tolaria_pb2.GetRunStatusRequest())
            assert _code(tolaria, None, *probe) == grpc.StatusCode.UNAUTHENTICATED
            assert _code(tolaria, TOKEN, *probe) == grpc.StatusCode.OK
            assert train.wait(timeout=600) == 0, train.output()[-4000:]
        finally:
            train.kill()

        summary = json.loads((run_dir / "summary.json").read_text())
        services = summary["services"]
        assert services["mode"] == "remote"
        assert services["outages"] == {"urza": 0, "tezzeret": 0, "oona": 0, "tamiyo": 0}, services["notes"]
        # Tamiyo answered Decide and Tezzeret took a compile (or Urza had the kernel), with the token.
        assert services["decisions"] >= 1 and summary["adaptations"], services
        assert services["germinations"] or any(n.startswith("compile requested") for n in services["notes"]), services
        assert not any("rejected" in n or "UNAUTHENTICATED" in n for n in services["notes"]), services["notes"]
        # Every lifecycle transition reached Oona (publishes carry the token).
        with open_sync_channel(ChannelConfig(stack.addresses["oona"], auth_token=TOKEN)) as channel:
            topics = {t.name: t.next_offset for t in oona_pb2_grpc.OonaServiceStub(channel).ListTopics(
                oona_pb2.ListTopicsRequest(), timeout=10).topics}
        assert topics["esper.lifecycle"] == len(read_jsonl(run_dir / "events.jsonl")) >= 1
        assert topics["esper.metrics"] == 30
