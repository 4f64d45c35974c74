"""Clients of Urza, the library of blueprints and kernel artifacts.

    with UrzaClient("127.0.0.1:5000") as urza:
        artifact, data = urza.download_artifact(kernel_id)         # SHA-256 verified here too
        seed = esper.tezzeret.load_kernel_artifact(data, expected_sha256=artifact.sha256)

`AsyncUrzaClient` is the asyncio twin; it also implements `esper.tezzeret.jobs.KernelLibrary`
(Tezzeret stores what it compiles through it). Reads and uploads are idempotent (the same bytes
under the same id again are a no-op) and so retried; failures raise `esper.errors` exceptions
(NotFoundError, DataLossError, UnavailableError, ...).
"""

from __future__ import annotations

import hashlib

from esper.clients.base import AioClient, SyncClient
from esper.errors import DataLossError, NotFoundError
from esper.serving.client import ChannelConfig, RetryPolicy
from esper.urza.library import MAX_CHUNK_BYTES
from esper.v1 import common_pb2, urza_pb2, urza_pb2_grpc

# Streams of artifact bytes get this long by default (a large artifact on a slow link).
TRANSFER_TIMEOUT_S = 300.0


def _upload_messages(artifact: common_pb2.KernelArtifact, data: bytes) -> list[urza_pb2.UploadArtifactRequest]:
    # A list (not a generator) so a retry can send the stream again from the start.
    meta = common_pb2.KernelArtifact()
    meta.CopyFrom(artifact)
    meta.sha256 = meta.sha256 or hashlib.sha256(data).hexdigest()
    meta.size_bytes = meta.size_bytes or len(data)
    return [urza_pb2.UploadArtifactRequest(metadata=meta)] + [
        urza_pb2.UploadArtifactRequest(chunk=data[i:i + MAX_CHUNK_BYTES]) for i in range(0, len(data), MAX_CHUNK_BYTES)]


def _verified(kernel_id: str, artifact: common_pb2.KernelArtifact | None, parts: list[bytes]
              ) -> tuple[common_pb2.KernelArtifact, bytes]:
    data = b"".join(parts)
    if artifact is None or hashlib.sha256(data).hexdigest() != artifact.sha256:
        raise DataLossError(f"artifact {kernel_id!r} arrived corrupted: its bytes do not match the SHA-256 "
                            "Urza reported", reason="CHECKSUM_MISMATCH", metadata={"kernel_id": kernel_id})
    return artifact, data


class UrzaClient(SyncClient):
    """Blocking client of one Urza server."""

    service = "Urza"

    def __init__(self, config: ChannelConfig | str, *, timeout_s: float = 10.0,
                 transfer_timeout_s: float = TRANSFER_TIMEOUT_S, retry: RetryPolicy | None = None):
        super().__init__(config, timeout_s=timeout_s, retry=retry)
        self._stub = urza_pb2_grpc.UrzaServiceStub(self._channel)
        self._transfer_timeout = transfer_timeout_s

    def get_artifact(self, kernel_id: str) -> common_pb2.KernelArtifact:
        return self._unary(self._stub.GetArtifact, urza_pb2.GetArtifactRequest(kernel_id=kernel_id),
                           idempotent=True).artifact

    def download_artifact(self, kernel_id: str) -> tuple[common_pb2.KernelArtifact, bytes]:
        """Metadata and bytes of an artifact; DataLossError if the bytes do not match their SHA-256."""
        artifact, parts = None, []
        for message in self._stream(self._stub.DownloadArtifact, urza_pb2.DownloadArtifactRequest(kernel_id=kernel_id),
                                    timeout=self._transfer_timeout):
            if message.WhichOneof("content") == "metadata":
                artifact = message.metadata
            else:
                parts.append(message.chunk)
        return _verified(kernel_id, artifact, parts)

    def upload_artifact(self, artifact: common_pb2.KernelArtifact, data: bytes) -> tuple[common_pb2.KernelArtifact, bool]:
        """Store an artifact (sha256 and size_bytes filled in when empty); (stored, created)."""
        reply = self._unary(self._stub.UploadArtifact, _upload_messages(artifact, data), idempotent=True,
                            timeout=self._transfer_timeout)
        return reply.artifact, reply.created

    def query_artifacts(self, **filters) -> list[common_pb2.KernelArtifact]:
        """Every artifact matching QueryArtifactsRequest fields (all pages)."""
        found: list[common_pb2.KernelArtifact] = []
        token = ""
        while True:
            reply = self._unary(self._stub.QueryArtifacts, urza_pb2.QueryArtifactsRequest(page_token=token, **filters),
                                idempotent=True)
            found.extend(reply.artifacts)
            token = reply.next_page_token
            if not token:
                return found

    def publish_policy(self, name: str, manifest_json: str, weights: bytes) -> tuple[urza_pb2.PolicyRecord, bool]:
        """Stores a learned policy as the next version of `name`; (stored record, created). The same
        manifest and weights again return the version already stored."""
        record = urza_pb2.PolicyRecord(name=name, manifest_json=manifest_json,
                                       weights_sha256=hashlib.sha256(weights).hexdigest())
        reply = self._unary(self._stub.PublishPolicy, urza_pb2.PublishPolicyRequest(policy=record, weights=weights),
                            idempotent=True, timeout=self._transfer_timeout)
        return reply.policy, reply.created

    def get_policy(self, name: str, version: int = 0, *, metadata_only: bool = False
                   ) -> tuple[urza_pb2.PolicyRecord, bytes]:
        """One version of a policy (0: the newest) and its weights, verified here against their
        SHA-256 (DataLossError on mismatch); NotFoundError for an unknown name or version."""
        reply = self._unary(self._stub.GetPolicy, urza_pb2.GetPolicyRequest(name=name, version=version,
                                                                             metadata_only=metadata_only),
                            idempotent=True, timeout=self._transfer_timeout)
        if not metadata_only and hashlib.sha256(reply.weights).hexdigest() != reply.policy.weights_sha256:
            raise DataLossError(f"policy {name!r} version {reply.policy.version} arrived corrupted: its weights do "
                                "not match the SHA-256 Urza reported", reason="CHECKSUM_MISMATCH",
                                metadata={"name": name, "version": str(reply.policy.version)})
        return reply.policy, reply.weights

    def get_blueprint(self, blueprint_id: str, version: int = 0) -> common_pb2.BlueprintSpec:
        return self._unary(self._stub.GetBlueprint,
                           urza_pb2.GetBlueprintRequest(blueprint_id=blueprint_id, version=version),
                           idempotent=True).blueprint

    def register_blueprint(self, spec: common_pb2.BlueprintSpec) -> tuple[common_pb2.BlueprintSpec, bool]:
        reply = self._unary(self._stub.RegisterBlueprint, urza_pb2.RegisterBlueprintRequest(blueprint=spec),
                            idempotent=True)
        return reply.blueprint, reply.created


class AsyncUrzaClient(AioClient):
    """asyncio client of one Urza server; `esper.tezzeret.jobs.KernelLibrary` over gRPC."""

    service = "Urza"

    def __init__(self, config: ChannelConfig | str, *, timeout_s: float = 10.0,
                 transfer_timeout_s: float = TRANSFER_TIMEOUT_S, retry: RetryPolicy | None = None):
        super().__init__(config, timeout_s=timeout_s, retry=retry)
        self._stub = urza_pb2_grpc.UrzaServiceStub(self._channel)
        self._transfer_timeout = transfer_timeout_s

    async def get_blueprint(self, blueprint_id: str, version: int) -> common_pb2.BlueprintSpec:
        reply = await self._unary(self._stub.GetBlueprint,
                                  urza_pb2.GetBlueprintRequest(blueprint_id=blueprint_id, version=version),
                                  idempotent=True)
        return reply.blueprint

    async def register_blueprint(self, spec: common_pb2.BlueprintSpec) -> common_pb2.BlueprintSpec:
        # Idempotent: registering identical content again is a no-op.
        reply = await self._unary(self._stub.RegisterBlueprint, urza_pb2.RegisterBlueprintRequest(blueprint=spec),
                                  idempotent=True)
        return reply.blueprint

    async def find_artifact(self, kernel_id: str, *, timeout: float | None = None) -> common_pb2.KernelArtifact | None:
        """The artifact's metadata, or None when Urza has no artifact of that id."""
        try:
            reply = await self._unary(self._stub.GetArtifact, urza_pb2.GetArtifactRequest(kernel_id=kernel_id),
                                      idempotent=True, timeout=timeout)
        except NotFoundError:
            return None
        return reply.artifact

    async def store_artifact(self, artifact: common_pb2.KernelArtifact, data: bytes) -> common_pb2.KernelArtifact:
        reply = await self._unary(self._stub.UploadArtifact, _upload_messages(artifact, data), idempotent=True,
                                  timeout=self._transfer_timeout)
        return reply.artifact

    async def record_artifact(self, artifact: common_pb2.KernelArtifact) -> common_pb2.KernelArtifact:
        reply = await self._unary(self._stub.RecordArtifact, urza_pb2.RecordArtifactRequest(artifact=artifact),
                                  idempotent=True)
        return reply.artifact

    async def download_artifact(self, kernel_id: str, *, timeout: float | None = None
                                ) -> tuple[common_pb2.KernelArtifact, bytes]:
        """Metadata and bytes of an artifact; DataLossError if the bytes do not match their SHA-256."""
        artifact, parts = None, []
        async for message in self._stream(self._stub.DownloadArtifact,
                                          urza_pb2.DownloadArtifactRequest(kernel_id=kernel_id),
                                          timeout=timeout or self._transfer_timeout):
            if message.WhichOneof("content") == "metadata":
                artifact = message.metadata
            else:
                parts.append(message.chunk)
        return _verified(kernel_id, artifact, parts)
