"""Thin TolariaService servicer over `esper.tolaria.control.RunControl`.

Requests that need the training thread (seed table, checkpoint, stop) are queued on the
`RunControl` and awaited here without blocking the event loop; the trainer serves them at its
next step boundary.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from esper.errors import FailedPreconditionError
from esper.tolaria.control import RunControl
from esper.v1 import tolaria_pb2, tolaria_pb2_grpc

SERVICE_NAME = "esper.v1.TolariaService"
# ListSeeds waits this long for a step boundary before answering from the last snapshot.
LIVE_TABLE_WAIT_S = 1.0


class TolariaServicer(tolaria_pb2_grpc.TolariaServiceServicer):
    """Run status, metrics stream, live seed table, checkpoint and graceful stop."""

    def __init__(self, control: RunControl):
        self.control = control

    async def _await(self, kind: str, **args):
        try:
            return await asyncio.wrap_future(self.control.submit(kind, **args))
        except RuntimeError as exc:
            raise FailedPreconditionError(str(exc)) from None

    async def GetRunStatus(self, request, context) -> tolaria_pb2.GetRunStatusResponse:
        return tolaria_pb2.GetRunStatusResponse(status=self.control.status())

    async def StreamMetrics(self, request: tolaria_pb2.StreamMetricsRequest, context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[tolaria_pb2.StreamMetricsResponse]:
        sub = self.control.subscribe(request.include_steps)
        try:
            while True:
                event = await sub.queue.get()
                if event is None:
                    return
                yield tolaria_pb2.StreamMetricsResponse(metrics=event)
        finally:
            self.control.unsubscribe(sub)

    async def ListSeeds(self, request: tolaria_pb2.ListSeedsRequest, context) -> tolaria_pb2.ListSeedsResponse:
        future = self.control.submit("seeds")
        try:
            rows = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), LIVE_TABLE_WAIT_S)
        except (TimeoutError, RuntimeError):
            future.cancel()
            rows = self.control.seeds_snapshot()
        if request.layer_name:
            rows = [r for r in rows if r.layer_name == request.layer_name]
        return tolaria_pb2.ListSeedsResponse(seeds=rows)

    async def RequestCheckpoint(self, request: tolaria_pb2.RequestCheckpointRequest, context
                                ) -> tolaria_pb2.RequestCheckpointResponse:
        path, step = await self._await("checkpoint", tag=request.tag)
        return tolaria_pb2.RequestCheckpointResponse(checkpoint_path=str(path), global_step=step)

    async def Stop(self, request: tolaria_pb2.StopRequest, context) -> tolaria_pb2.StopResponse:
        path, step = await self._await("stop", reason=request.reason or "Stop requested over gRPC")
        return tolaria_pb2.StopResponse(checkpoint_path=str(path), global_step=step)
