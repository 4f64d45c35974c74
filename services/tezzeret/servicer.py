"""TezzeretService: translates requests to `esper.tezzeret.CompileJobs`."""

from __future__ import annotations

from esper.tezzeret import CompileJobs
from esper.v1 import tezzeret_pb2, tezzeret_pb2_grpc

SERVICE_NAME = "esper.v1.TezzeretService"


class TezzeretServicer(tezzeret_pb2_grpc.TezzeretServiceServicer):
    """Thin servicer; compiles run in worker processes, never on the event loop."""

    def __init__(self, jobs: CompileJobs):
        self.jobs = jobs

    async def Compile(self, request, context):
        return tezzeret_pb2.CompileResponse(job=await self.jobs.compile(request))

    async def GetCompileJob(self, request, context):
        return tezzeret_pb2.GetCompileJobResponse(job=self.jobs.get(request.job_id))

    async def WatchCompileJob(self, request, context):
        async for job in self.jobs.watch(request.job_id):
            yield tezzeret_pb2.WatchCompileJobResponse(job=job)

    async def ListCompileJobs(self, request, context):
        jobs, token = self.jobs.list(request.state, request.page_size, request.page_token)
        return tezzeret_pb2.ListCompileJobsResponse(jobs=jobs, next_page_token=token)

    async def CancelCompileJob(self, request, context):
        return tezzeret_pb2.CancelCompileJobResponse(job=await self.jobs.cancel(request.job_id))
