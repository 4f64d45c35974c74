"""UrzaService: translates requests to `esper.urza.UrzaLibrary` calls run in worker threads."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from esper.errors import InvalidArgumentError
from esper.serving.auth import ROLE_COMPILER, current_principal
from esper.urza import ArtifactUpload, UrzaLibrary
from esper.v1 import urza_pb2, urza_pb2_grpc

log = logging.getLogger("esper.urza")
SERVICE_NAME = "esper.v1.UrzaService"
_END = object()


class UrzaServicer(urza_pb2_grpc.UrzaServiceServicer):
    """Thin servicer: every blocking library call goes to a thread, never on the event loop."""

    def __init__(self, library: UrzaLibrary):
        self.library = library

    async def close(self) -> None:
        await asyncio.to_thread(self.library.close)

    async def RegisterBlueprint(self, request, context):
        if not request.HasField("blueprint"):
            raise InvalidArgumentError("blueprint is required", field="blueprint")
        spec, created = await asyncio.to_thread(self.library.register_blueprint, request.blueprint)
        return urza_pb2.RegisterBlueprintResponse(blueprint=spec, created=created)

    async def GetBlueprint(self, request, context):
        spec = await asyncio.to_thread(self.library.get_blueprint, request.blueprint_id, request.version)
        return urza_pb2.GetBlueprintResponse(blueprint=spec)

    async def ListBlueprints(self, request, context):
        specs, token = await asyncio.to_thread(
            self.library.list_blueprints, family=request.family, input_kind=request.input_kind,
            tags=list(request.tags), page_size=request.page_size, page_token=request.page_token)
        return urza_pb2.ListBlueprintsResponse(blueprints=specs, next_page_token=token)

    async def UploadArtifact(self, request_iterator: AsyncIterator, context):
        upload: ArtifactUpload | None = None
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("content")
                if upload is None:
                    if kind != "metadata":
                        raise InvalidArgumentError("the first UploadArtifact message must carry metadata",
                                                   field="metadata")
                    caller = current_principal()
                    upload = await asyncio.to_thread(self.library.begin_upload, message.metadata, caller=caller.name,
                                                     may_certify=caller.has_role(ROLE_COMPILER))
                elif kind == "chunk":
                    await asyncio.to_thread(upload.write, message.chunk)
                else:
                    raise InvalidArgumentError("only the first UploadArtifact message may carry metadata; "
                                               f"got {kind or 'an empty message'} after it", field="content")
            if upload is None:
                raise InvalidArgumentError("UploadArtifact stream was empty; expected metadata then chunks",
                                           field="metadata")
            artifact, created = await asyncio.to_thread(upload.finish)
            upload = None
            return urza_pb2.UploadArtifactResponse(artifact=artifact, created=created)
        finally:
            # A stream cut by the client (cancellation) or an error: nothing becomes visible.
            if upload is not None:
                await asyncio.to_thread(upload.abort)

    async def DownloadArtifact(self, request, context):
        artifact, chunks = await asyncio.to_thread(self.library.open_download, request.kernel_id,
                                                   request.chunk_size)
        # Verification happens inside the iterator; the first chunk is read before the metadata is
        # sent so a corrupted small blob fails with DATA_LOSS before any byte goes out.
        first = await asyncio.to_thread(next, chunks, _END)
        yield urza_pb2.DownloadArtifactResponse(metadata=artifact)
        chunk = first
        while chunk is not _END:
            yield urza_pb2.DownloadArtifactResponse(chunk=chunk)
            chunk = await asyncio.to_thread(next, chunks, _END)

    async def RecordArtifact(self, request, context):
        if not request.HasField("artifact"):
            raise InvalidArgumentError("artifact is required", field="artifact")
        artifact = await asyncio.to_thread(self.library.record_artifact, request.artifact)
        return urza_pb2.RecordArtifactResponse(artifact=artifact)

    async def GetArtifact(self, request, context):
        # Finished artifacts are immutable: answer from memory without a thread hop when possible.
        artifact = self.library.cached_artifact(request.kernel_id)
        if artifact is None:
            artifact = await asyncio.to_thread(self.library.get_artifact, request.kernel_id)
        return urza_pb2.GetArtifactResponse(artifact=artifact)

    async def QueryArtifacts(self, request, context):
        artifacts, token = await asyncio.to_thread(
            self.library.query_artifacts, blueprint_id=request.blueprint_id, status=request.status,
            input_shape=list(request.input_shape.dims), device=request.device, dtype=request.dtype,
            tags=list(request.tags), page_size=request.page_size, page_token=request.page_token)
        return urza_pb2.QueryArtifactsResponse(artifacts=artifacts, next_page_token=token)

    async def PublishPolicy(self, request, context):
        if not request.HasField("policy"):
            raise InvalidArgumentError("policy is required", field="policy")
        record, created = await asyncio.to_thread(self.library.policies.publish, request.policy, request.weights)
        return urza_pb2.PublishPolicyResponse(policy=record, created=created)

    async def GetPolicy(self, request, context):
        record, weights = await asyncio.to_thread(self.library.policies.get, request.name, request.version,
                                                  metadata_only=request.metadata_only)
        return urza_pb2.GetPolicyResponse(policy=record, weights=weights)
