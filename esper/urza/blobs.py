"""Content-addressed blob store: bytes live under their SHA-256, immutable and verified on read.

Layout under the root::

    sha256/ab/abcdef...   one file per distinct content (name = full hex digest)
    tmp/                  uploads in progress (same filesystem, so the final rename is atomic)

A write goes to a temp file, is hashed while written, fsynced, then renamed into place and the
directory fsynced: a crash or a cut upload never leaves a partial blob under a digest name.
No client-supplied string is ever used to build a path: names come from digests computed here.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from esper.durable import fsync_dir
from esper.errors import DataLossError, InvalidArgumentError, quoted

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# Blobs up to this size are read once into memory, verified, then served from memory; larger
# ones are hashed in a first pass and re-hashed while served.
SINGLE_PASS_LIMIT = 32 * 1024 * 1024
READ_BLOCK = 1024 * 1024


def is_sha256_hex(value: str) -> bool:
    """True for a lowercase 64-character hex digest."""
    return bool(_HEX64.match(value))


class BlobWriter:
    """An in-progress write. `write()` chunks, then `commit()` or `abort()`; usable as a context
    manager that aborts unless committed."""

    def __init__(self, store: BlobStore):
        self._store = store
        fd, name = tempfile.mkstemp(prefix="upload-", dir=store.tmp_dir)
        self._file = os.fdopen(fd, "wb")
        self._path = Path(name)
        self._hash = hashlib.sha256()
        self.size = 0
        self._done = False

    def write(self, data: bytes) -> None:
        """Append bytes (hashed as they are written)."""
        if self._done:
            raise RuntimeError("write after commit/abort")
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def commit(self) -> str:
        """Make the bytes durable under their digest; returns the hex SHA-256."""
        if self._done:
            raise RuntimeError("commit after commit/abort")
        self._done = True
        digest = self._hash.hexdigest()
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            final = self._store.path_for(digest)
            if final.exists() and self._store.verify_file(final, digest):
                # Identical content already stored (immutable): keep the existing file.
                self._path.unlink(missing_ok=True)
                return digest
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._path, final)
            fsync_dir(final.parent)
        except BaseException:
            self._path.unlink(missing_ok=True)
            raise
        return digest

    def abort(self) -> None:
        """Discard the partial write; nothing becomes visible."""
        if self._done:
            return
        self._done = True
        try:
            self._file.close()
        finally:
            self._path.unlink(missing_ok=True)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.abort()


class BlobStore:
    """Blobs on the local filesystem, addressed by SHA-256."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.blob_dir = self.root / "sha256"
        self.tmp_dir = self.root / "tmp"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        # Left over by a crash mid-upload; never visible, safe to drop at startup.
        for stale in self.tmp_dir.glob("upload-*"):
            stale.unlink(missing_ok=True)

    def path_for(self, sha256: str) -> Path:
        """Where the blob of this digest lives (the digest is validated first)."""
        if not is_sha256_hex(sha256):
            raise InvalidArgumentError(f"sha256 must be 64 lowercase hex characters, got {quoted(sha256)}",
                                       field="sha256")
        return self.blob_dir / sha256[:2] / sha256

    def writer(self) -> BlobWriter:
        """Start writing a new blob."""
        return BlobWriter(self)

    def put(self, data: bytes) -> str:
        """Store bytes in one call; returns the digest."""
        with self.writer() as writer:
            writer.write(data)
            return writer.commit()

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    @staticmethod
    def verify_file(path: Path, sha256: str) -> bool:
        """True when the file's bytes hash to `sha256`."""
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(READ_BLOCK):
                digest.update(block)
        return digest.hexdigest() == sha256

    def read_chunks(self, sha256: str, chunk_size: int = READ_BLOCK) -> Iterator[bytes]:
        """The blob's bytes in chunks, verified against the digest.

        Raises DataLossError when the blob is missing or its bytes do not match: for blobs up to
        SINGLE_PASS_LIMIT before any byte is returned; larger blobs are verified in a first pass,
        then re-hashed while served and a mismatch (a change during the read) raises at the end.
        """
        path = self.path_for(sha256)
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise DataLossError(f"blob {sha256} is missing from the store", reason="BLOB_MISSING",
                                metadata={"sha256": sha256}) from None
        if size <= SINGLE_PASS_LIMIT:
            data = path.read_bytes()
            self._check(hashlib.sha256(data).hexdigest(), sha256)
            view = memoryview(data)
            for start in range(0, len(data), chunk_size):
                yield bytes(view[start:start + chunk_size])
            return
        if not self.verify_file(path, sha256):
            self._check("<mismatch>", sha256)
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk_size):
                digest.update(block)
                yield block
        self._check(digest.hexdigest(), sha256)

    def read_bytes(self, sha256: str) -> bytes:
        """The whole blob, verified."""
        return b"".join(self.read_chunks(sha256))

    @staticmethod
    def _check(actual: str, expected: str) -> None:
        if actual != expected:
            raise DataLossError(f"blob {expected} is corrupted on disk: its bytes no longer match their SHA-256",
                                reason="CHECKSUM_MISMATCH", metadata={"sha256": expected})
