"""Thin TamiyoService servicer: protobuf in, `esper.tamiyo.service.TamiyoCore` calls, protobuf out.

Replay-buffer writes (fsync) run in worker threads, never on the event loop; so do decisions of a
learned (torch) policy. A heuristic decision (pure Python over the graph message, no torch or I/O)
runs inline because a thread hop costs more.
"""

from __future__ import annotations

import asyncio

import grpc

from esper.tamiyo.service import TamiyoCore
from esper.v1 import tamiyo_pb2, tamiyo_pb2_grpc

SERVICE_NAME = "esper.v1.TamiyoService"


class TamiyoServicer(tamiyo_pb2_grpc.TamiyoServiceServicer):
    """Decide / ReportOutcome / GetPolicyInfo over a `TamiyoCore`."""

    def __init__(self, core: TamiyoCore):
        self.core = core

    async def Decide(self, request: tamiyo_pb2.DecideRequest, context: grpc.aio.ServicerContext
                     ) -> tamiyo_pb2.DecideResponse:
        if self.core.uses_torch:  # a network forward pass: keep torch off the event loop
            decisions = await asyncio.to_thread(self.core.decide, request.graph)
        else:  # pure Python, ~0.2 ms for a small graph (no torch, no file I/O): a thread hop would cost more
            decisions = self.core.decide(request.graph)
        return tamiyo_pb2.DecideResponse(decisions=decisions, policy_version=self.core.version)

    async def ReportOutcome(self, request: tamiyo_pb2.ReportOutcomeRequest, context: grpc.aio.ServicerContext
                            ) -> tamiyo_pb2.ReportOutcomeResponse:
        report_id, size = await asyncio.to_thread(self.core.report, request.report)
        return tamiyo_pb2.ReportOutcomeResponse(report_id=report_id, replay_buffer_size=size)

    async def GetPolicyInfo(self, request: tamiyo_pb2.GetPolicyInfoRequest, context: grpc.aio.ServicerContext
                            ) -> tamiyo_pb2.GetPolicyInfoResponse:
        info = self.core.policy_info()
        return tamiyo_pb2.GetPolicyInfoResponse(policy_kind=info["kind"], policy_version=info["version"],
                                                replay_buffer_size=len(self.core.replay),
                                                rails=self.core.rails_info(), policy_source=info["source"],
                                                policy_swaps=info["swaps"], feature_schema=info["feature_schema"])

    async def close(self) -> None:
        await asyncio.to_thread(self.core.close)
