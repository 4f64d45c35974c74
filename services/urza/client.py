"""A blocking Urza client for processes outside an event loop (the trainer, scripts, tests).

    with UrzaClient("127.0.0.1:5000") as urza:
        artifact, data = urza.download_artifact(kernel_id)         # SHA-256 verified here too
        seed = esper.tezzeret.load_kernel_artifact(data, expected_sha256=artifact.sha256)

Every call carries a deadline; reads are retried on UNAVAILABLE (idempotent), failures raise
`esper.errors` exceptions (NotFoundError, DataLossError, UnavailableError, ...).
"""

from __future__ import annotations

import hashlib

import grpc

from esper.errors import DataLossError
from esper.serving import ChannelConfig, open_sync_channel, stream_call, unary_call_sync
from esper.serving.errors import domain_error_from_rpc_error
from esper.urza.library import MAX_CHUNK_BYTES
from esper.v1 import common_pb2, urza_pb2, urza_pb2_grpc


class UrzaClient:
    """Blocking client of one Urza server."""

    def __init__(self, config: ChannelConfig | str, *, timeout_s: float = 10.0, transfer_timeout_s: float = 300.0):
        self.config = ChannelConfig(config) if isinstance(config, str) else config
        self._channel = open_sync_channel(self.config)
        self._stub = urza_pb2_grpc.UrzaServiceStub(self._channel)
        self._timeout = timeout_s
        self._transfer_timeout = transfer_timeout_s

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> UrzaClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _error(self, err: grpc.RpcError) -> Exception:
        return domain_error_from_rpc_error(err, upstream=f"Urza at {self.config.address}")

    def get_artifact(self, kernel_id: str) -> common_pb2.KernelArtifact:
        try:
            return unary_call_sync(self._stub.GetArtifact, urza_pb2.GetArtifactRequest(kernel_id=kernel_id),
                                   timeout=self._timeout, idempotent=True).artifact
        except grpc.RpcError as err:
            raise self._error(err) from err

    def download_artifact(self, kernel_id: str) -> tuple[common_pb2.KernelArtifact, bytes]:
        """Metadata and bytes of an artifact; DataLossError if the bytes do not match their SHA-256."""
        artifact, parts = None, []
        try:
            for message in stream_call(self._stub.DownloadArtifact,
                                       urza_pb2.DownloadArtifactRequest(kernel_id=kernel_id),
                                       timeout=self._transfer_timeout):
                if message.WhichOneof("content") == "metadata":
                    artifact = message.metadata
                else:
                    parts.append(message.chunk)
        except grpc.RpcError as err:
            raise self._error(err) from err
        data = b"".join(parts)
        if artifact is None or hashlib.sha256(data).hexdigest() != artifact.sha256:
            raise DataLossError(f"artifact {kernel_id!r} arrived corrupted: its bytes do not match the SHA-256 "
                                "Urza reported", reason="CHECKSUM_MISMATCH", metadata={"kernel_id": kernel_id})
        return artifact, data

    def upload_artifact(self, artifact: common_pb2.KernelArtifact, data: bytes) -> tuple[common_pb2.KernelArtifact, bool]:
        """Store an artifact (sha256 and size_bytes filled in when empty); (stored, created)."""
        meta = common_pb2.KernelArtifact()
        meta.CopyFrom(artifact)
        meta.sha256 = meta.sha256 or hashlib.sha256(data).hexdigest()
        meta.size_bytes = meta.size_bytes or len(data)
        messages = [urza_pb2.UploadArtifactRequest(metadata=meta)]
        messages += [urza_pb2.UploadArtifactRequest(chunk=data[i:i + MAX_CHUNK_BYTES])
                     for i in range(0, len(data), MAX_CHUNK_BYTES)]
        try:
            # Idempotent: the same bytes under the same id again is a no-op.
            reply = unary_call_sync(self._stub.UploadArtifact, messages, timeout=self._transfer_timeout,
                                    idempotent=True)
        except grpc.RpcError as err:
            raise self._error(err) from err
        return reply.artifact, reply.created

    def query_artifacts(self, **filters) -> list[common_pb2.KernelArtifact]:
        """Every artifact matching QueryArtifactsRequest fields (all pages)."""
        found: list[common_pb2.KernelArtifact] = []
        token = ""
        while True:
            request = urza_pb2.QueryArtifactsRequest(page_token=token, **filters)
            try:
                reply = unary_call_sync(self._stub.QueryArtifacts, request, timeout=self._timeout, idempotent=True)
            except grpc.RpcError as err:
                raise self._error(err) from err
            found.extend(reply.artifacts)
            token = reply.next_page_token
            if not token:
                return found

    def get_blueprint(self, blueprint_id: str, version: int = 0) -> common_pb2.BlueprintSpec:
        try:
            return unary_call_sync(self._stub.GetBlueprint,
                                   urza_pb2.GetBlueprintRequest(blueprint_id=blueprint_id, version=version),
                                   timeout=self._timeout, idempotent=True).blueprint
        except grpc.RpcError as err:
            raise self._error(err) from err

    def register_blueprint(self, spec: common_pb2.BlueprintSpec) -> tuple[common_pb2.BlueprintSpec, bool]:
        try:
            reply = unary_call_sync(self._stub.RegisterBlueprint, urza_pb2.RegisterBlueprintRequest(blueprint=spec),
                                    timeout=self._timeout, idempotent=True)
        except grpc.RpcError as err:
            raise self._error(err) from err
        return reply.blueprint, reply.created
