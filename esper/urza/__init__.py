"""Urza: the library of blueprints and compiled kernel artifacts.

    from esper.urza import UrzaLibrary
    library = UrzaLibrary("/var/lib/esper/urza")                       # SQLite + blobs in that dir
    library = UrzaLibrary(d, database_url="postgresql://u@127.0.0.1:5432/urza")
    spec, created = library.register_blueprint(spec)                  # validated
    artifact, created = library.upload_bytes(metadata, data)           # immutable, content-addressed
    meta, chunks = library.open_download(kernel_id)                    # verified (DataLossError)

The gRPC face is `services.urza` (console script ``esper-urza``); `esper.clients.UrzaClient`
is a blocking client of it (verified downloads) for the trainer and scripts.
"""

from esper.urza.blobs import BlobStore
from esper.urza.library import (
    MAX_CHUNK_BYTES,
    ArtifactUpload,
    UrzaLibrary,
    shape_text,
    spec_sha256,
    validate_blueprint_spec,
    validate_shape,
)

__all__ = [
    "MAX_CHUNK_BYTES",
    "ArtifactUpload",
    "BlobStore",
    "UrzaLibrary",
    "shape_text",
    "spec_sha256",
    "validate_blueprint_spec",
    "validate_shape",
]
