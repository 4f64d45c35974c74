"""`TezzeretClient`: compile jobs on a Tezzeret server (asyncio)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from esper.clients.base import AioClient
from esper.serving.client import ChannelConfig, RetryPolicy
from esper.v1 import common_pb2, tezzeret_pb2, tezzeret_pb2_grpc

FAILED_JOB_STATES = frozenset({tezzeret_pb2.COMPILE_JOB_STATE_FAILED, tezzeret_pb2.COMPILE_JOB_STATE_TIMED_OUT,
                               tezzeret_pb2.COMPILE_JOB_STATE_CANCELLED})


class TezzeretClient(AioClient):
    """Request compiles, read and watch their jobs."""

    service = "Tezzeret"

    def __init__(self, config: ChannelConfig | str, *, timeout_s: float = 10.0, retry: RetryPolicy | None = None):
        super().__init__(config, timeout_s=timeout_s, retry=retry)
        self._stub = tezzeret_pb2_grpc.TezzeretServiceStub(self._channel)

    async def compile(self, spec: common_pb2.BlueprintSpec, shape: list[int], device: int, dtype: int, *,
                      timeout_seconds: float, timeout: float | None = None) -> tezzeret_pb2.CompileJob:
        """Request a compile; Tezzeret reuses the job of an identical request, so this is idempotent."""
        request = tezzeret_pb2.CompileRequest(blueprint=spec, device=device, dtype=dtype,
                                              timeout_seconds=timeout_seconds)
        request.input_shape.dims.extend(shape)
        return (await self._unary(self._stub.Compile, request, idempotent=True, timeout=timeout)).job

    async def get_compile_job(self, job_id: str, *, timeout: float | None = None) -> tezzeret_pb2.CompileJob:
        """The job's current state; NotFoundError when Tezzeret does not know it (e.g. restarted)."""
        return (await self._unary(self._stub.GetCompileJob, tezzeret_pb2.GetCompileJobRequest(job_id=job_id),
                                  idempotent=True, timeout=timeout)).job

    async def watch_compile_job(self, job_id: str, *, timeout: float) -> AsyncIterator[tezzeret_pb2.CompileJob]:
        """Every state change of the job until it ends or `timeout` passes."""
        async for reply in self._stream(self._stub.WatchCompileJob,
                                        tezzeret_pb2.WatchCompileJobRequest(job_id=job_id), timeout=timeout):
            yield reply.job
