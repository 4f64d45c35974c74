"""`TamiyoClient`: decisions for a model graph and outcome reports (asyncio)."""

from __future__ import annotations

from esper.clients.base import AioClient
from esper.serving.client import ChannelConfig, RetryPolicy
from esper.v1 import common_pb2, tamiyo_pb2, tamiyo_pb2_grpc


class TamiyoClient(AioClient):
    """Ask Tamiyo for decisions and report their outcomes."""

    service = "Tamiyo"

    def __init__(self, config: ChannelConfig | str, *, timeout_s: float = 10.0, retry: RetryPolicy | None = None):
        super().__init__(config, timeout_s=timeout_s, retry=retry)
        self._stub = tamiyo_pb2_grpc.TamiyoServiceStub(self._channel)

    async def decide(self, graph: common_pb2.ModelGraphState, *,
                     timeout: float | None = None) -> list[common_pb2.AdaptationDecision]:
        """Tamiyo's decisions for one graph. Not retried: a decision updates the policy's state
        (cooldowns, budgets), and a late answer is worth less than none."""
        reply = await self._unary(self._stub.Decide, tamiyo_pb2.DecideRequest(graph=graph), idempotent=False,
                                  timeout=timeout)
        return list(reply.decisions)

    async def report_outcome(self, report: common_pb2.FieldReport, *, timeout: float | None = None) -> None:
        """Record one adaptation's outcome. Not retried (a retry could record it twice)."""
        await self._unary(self._stub.ReportOutcome, tamiyo_pb2.ReportOutcomeRequest(report=report),
                          idempotent=False, timeout=timeout)

    async def get_policy_info(self, *, timeout: float | None = None) -> tamiyo_pb2.GetPolicyInfoResponse:
        """Which policy Tamiyo serves (kind, version, manifest)."""
        return await self._unary(self._stub.GetPolicyInfo, tamiyo_pb2.GetPolicyInfoRequest(), idempotent=True,
                                 timeout=timeout)
