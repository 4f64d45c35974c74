"""Tezzeret's clients of other servers: Urza (the kernel library) and Oona (kernel-ready events).

They implement `esper.tezzeret.jobs.KernelLibrary` / `KernelEventPublisher` over gRPC with the
shared client helpers: every call has a deadline, only idempotent calls are retried, and failures
come back as domain errors (so Tezzeret relays Urza's INVALID_ARGUMENT with its field).
"""

from __future__ import annotations

import grpc

from esper.serving import ChannelConfig, open_aio_channel, unary_call
from esper.serving.errors import domain_error_from_rpc_error
from esper.urza import MAX_CHUNK_BYTES
from esper.v1 import common_pb2, oona_pb2, oona_pb2_grpc, urza_pb2, urza_pb2_grpc

KERNEL_READY_TOPIC = "esper.kernel.ready"
KERNEL_READY_CONTENT_TYPE = "application/x-protobuf; type=esper.v1.KernelReadyEvent"


class UrzaClient:
    """`KernelLibrary` backed by an Urza server."""

    def __init__(self, config: ChannelConfig, *, timeout_s: float = 10.0, upload_timeout_s: float = 120.0):
        self.address = config.address
        self._channel = open_aio_channel(config)
        self._stub = urza_pb2_grpc.UrzaServiceStub(self._channel)
        self._timeout = timeout_s
        self._upload_timeout = upload_timeout_s

    @property
    def channel(self) -> grpc.aio.Channel:
        return self._channel

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method, request, *, idempotent: bool, timeout: float | None = None):
        try:
            return await unary_call(method, request, timeout=timeout or self._timeout, idempotent=idempotent)
        except grpc.aio.AioRpcError as err:
            raise domain_error_from_rpc_error(err, upstream=f"Urza at {self.address}") from err

    async def get_blueprint(self, blueprint_id: str, version: int) -> common_pb2.BlueprintSpec:
        reply = await self._call(self._stub.GetBlueprint,
                                 urza_pb2.GetBlueprintRequest(blueprint_id=blueprint_id, version=version),
                                 idempotent=True)
        return reply.blueprint

    async def register_blueprint(self, spec: common_pb2.BlueprintSpec) -> common_pb2.BlueprintSpec:
        # Idempotent: registering identical content again is a no-op.
        reply = await self._call(self._stub.RegisterBlueprint, urza_pb2.RegisterBlueprintRequest(blueprint=spec),
                                 idempotent=True)
        return reply.blueprint

    async def find_artifact(self, kernel_id: str) -> common_pb2.KernelArtifact | None:
        try:
            reply = await unary_call(self._stub.GetArtifact, urza_pb2.GetArtifactRequest(kernel_id=kernel_id),
                                     timeout=self._timeout, idempotent=True)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise domain_error_from_rpc_error(err, upstream=f"Urza at {self.address}") from err
        return reply.artifact

    async def store_artifact(self, artifact: common_pb2.KernelArtifact, data: bytes) -> common_pb2.KernelArtifact:
        # A list (not a generator) so a retry can send the stream again; identical re-uploads are no-ops.
        messages = [urza_pb2.UploadArtifactRequest(metadata=artifact)]
        messages += [urza_pb2.UploadArtifactRequest(chunk=data[i:i + MAX_CHUNK_BYTES])
                     for i in range(0, len(data), MAX_CHUNK_BYTES)]
        reply = await self._call(self._stub.UploadArtifact, messages, idempotent=True,
                                 timeout=self._upload_timeout)
        return reply.artifact

    async def record_artifact(self, artifact: common_pb2.KernelArtifact) -> common_pb2.KernelArtifact:
        reply = await self._call(self._stub.RecordArtifact, urza_pb2.RecordArtifactRequest(artifact=artifact),
                                 idempotent=True)
        return reply.artifact


class OonaKernelPublisher:
    """`KernelEventPublisher` that publishes `esper.v1.KernelReadyEvent` on Oona's
    ``esper.kernel.ready`` topic, keyed by kernel id. Publish is not idempotent (a retry could
    duplicate the event), so it is never retried."""

    def __init__(self, config: ChannelConfig, *, timeout_s: float = 5.0, topic: str = KERNEL_READY_TOPIC):
        self.address = config.address
        self.topic = topic
        self._channel = open_aio_channel(config)
        self._stub = oona_pb2_grpc.OonaServiceStub(self._channel)
        self._timeout = timeout_s

    async def close(self) -> None:
        await self._channel.close()

    async def publish_kernel_ready(self, event: common_pb2.KernelReadyEvent) -> None:
        request = oona_pb2.PublishRequest(topic=self.topic, key=event.artifact.kernel_id,
                                          content_type=KERNEL_READY_CONTENT_TYPE,
                                          payload=event.SerializeToString(), source="tezzeret")
        try:
            await unary_call(self._stub.Publish, request, timeout=self._timeout, idempotent=False)
        except grpc.aio.AioRpcError as err:
            raise domain_error_from_rpc_error(err, upstream=f"Oona at {self.address}") from err
