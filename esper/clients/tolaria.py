"""`TolariaClient`: a running training run's status, metrics, seed table, checkpoint and stop
(blocking; the run's Tolaria server address is in ``<run dir>/services/tolaria.address``)."""

from __future__ import annotations

from collections.abc import Iterator

from esper.clients.base import SyncClient
from esper.serving.client import ChannelConfig, RetryPolicy
from esper.v1 import common_pb2, tolaria_pb2, tolaria_pb2_grpc


class TolariaClient(SyncClient):
    """Blocking client of one run's Tolaria server."""

    service = "Tolaria"

    def __init__(self, config: ChannelConfig | str, *, timeout_s: float = 10.0, retry: RetryPolicy | None = None):
        super().__init__(config, timeout_s=timeout_s, retry=retry)
        self._stub = tolaria_pb2_grpc.TolariaServiceStub(self._channel)

    def get_run_status(self) -> tolaria_pb2.RunStatus:
        return self._unary(self._stub.GetRunStatus, tolaria_pb2.GetRunStatusRequest(), idempotent=True).status

    def list_seeds(self, layer_name: str = "") -> list[common_pb2.SeedSlot]:
        return list(self._unary(self._stub.ListSeeds, tolaria_pb2.ListSeedsRequest(layer_name=layer_name),
                                idempotent=True).seeds)

    def request_checkpoint(self, tag: str = "", *, timeout: float = 60.0) -> tolaria_pb2.RequestCheckpointResponse:
        """Save a checkpoint at the next step boundary. Not retried (each call writes one)."""
        return self._unary(self._stub.RequestCheckpoint, tolaria_pb2.RequestCheckpointRequest(tag=tag),
                           idempotent=False, timeout=timeout)

    def stop(self, reason: str = "", *, timeout: float = 60.0) -> tolaria_pb2.StopResponse:
        """Stop the run gracefully (checkpoint first); idempotent (a stopped run stays stopped)."""
        return self._unary(self._stub.Stop, tolaria_pb2.StopRequest(reason=reason), idempotent=True, timeout=timeout)

    def stream_metrics(self, *, include_steps: bool = False, timeout: float = 24 * 3600.0
                       ) -> Iterator[common_pb2.MetricsEvent]:
        """Metrics events until the run ends or `timeout` passes."""
        for reply in self._stream(self._stub.StreamMetrics,
                                  tolaria_pb2.StreamMetricsRequest(include_steps=include_steps), timeout=timeout):
            yield reply.metrics
