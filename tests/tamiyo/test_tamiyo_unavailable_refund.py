"""A germination cancelled because a service was unavailable does not use up max_adaptations
(real Tamiyo server on port 0)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from test_tamiyo_server import graph

from esper.serving import GrpcServer, ServerConfig
from esper.tamiyo.service import TamiyoCore
from esper.tamiyo.settings import PolicySettings
from esper.v1 import common_pb2, tamiyo_pb2, tamiyo_pb2_grpc
from services.tamiyo.servicer import SERVICE_NAME, TamiyoServicer

pytestmark = pytest.mark.integration
GERMINATE = common_pb2.DECISION_ACTION_GERMINATE


def test_service_unavailable_outcome_gives_the_adaptation_back(tmp_path):
    settings = PolicySettings(start_epoch=1, cooldown_epochs=0, max_concurrent=4, max_adaptations=1,
                              blueprints=["residual_mlp"])

    async def scenario():
        server = GrpcServer(ServerConfig())
        server.add_service(SERVICE_NAME, TamiyoServicer(TamiyoCore(settings, tmp_path / "replay")),
                           tamiyo_pb2_grpc.add_TamiyoServiceServicer_to_server)
        await server.start()
        await server.set_serving()
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = tamiyo_pb2_grpc.TamiyoServiceStub(channel)

                async def decide(epoch):
                    reply = await stub.Decide(tamiyo_pb2.DecideRequest(graph=graph(epoch=epoch)), timeout=10)
                    return [d for d in reply.decisions if d.action == GERMINATE], reply.decisions

                first, _ = await decide(3)
                assert len(first) == 1
                held, decisions = await decide(4)
                assert not held and any("max_adaptations" in d.reason for d in decisions)
                # An ordinary cancellation keeps counting ...
                report = common_pb2.FieldReport(run_id="run-a", decision=first[0],
                                                outcome=common_pb2.ADAPTATION_OUTCOME_CANCELLED)
                await stub.ReportOutcome(tamiyo_pb2.ReportOutcomeRequest(report=report), timeout=10)
                assert not (await decide(5))[0]
                # ... one caused by an unavailable service gives the adaptation back.
                report.outcome = common_pb2.ADAPTATION_OUTCOME_SERVICE_UNAVAILABLE
                await stub.ReportOutcome(tamiyo_pb2.ReportOutcomeRequest(report=report), timeout=10)
                again, _ = await decide(6)
                assert len(again) == 1
                # A repeated report of the same decision does not give back twice.
                await stub.ReportOutcome(tamiyo_pb2.ReportOutcomeRequest(report=report), timeout=10)
                held, _ = await decide(7)
                assert held == []
        finally:
            await server.stop(0)

    asyncio.run(scenario())
