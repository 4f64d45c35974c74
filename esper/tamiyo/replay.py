"""Tamiyo's replay buffer: field reports appended to one file on disk, durable across restarts.

Layout: a sequence of records ``[4-byte big-endian length][4-byte CRC-32][payload]`` where the
payload is a serialised `esper.v1.FieldReport`. Each append is written, flushed and fsync'd before
it is acknowledged, so an acknowledged report survives a crash of the process or the machine.

A crash in the middle of an append leaves a torn record at the end. Opening the buffer scans the
file, keeps every record whose length and checksum are intact, and truncates the file after the
last good one (the torn tail is reported in `truncated_bytes`). A bad record in the middle cannot
be produced by appends alone; it is treated the same way (everything after it is cut) because the
record boundaries after it cannot be trusted.

Thread-safe; callers on an event loop run `append` in a worker thread (it does file I/O).
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

from esper.v1 import common_pb2

_HEADER = struct.Struct(">II")
# A single field report is a few KiB; anything larger is a corrupt length, not a record.
MAX_RECORD_BYTES = 16 << 20
FILE_NAME = "field_reports.bin"


class ReplayBuffer:
    """Append-only, fsync'd store of `FieldReport`s in ``directory/field_reports.bin``."""

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / FILE_NAME
        self._lock = threading.Lock()
        self.truncated_bytes = 0
        self._count, good_end = self._scan()
        with self.path.open("ab") as fh:
            size = fh.tell()
            if size > good_end:
                self.truncated_bytes = size - good_end
                fh.truncate(good_end)
                fh.flush()
                os.fsync(fh.fileno())
        self._file = self.path.open("ab")

    def _scan(self) -> tuple[int, int]:
        """(intact records, byte offset just after the last intact one)."""
        count = 0
        end = 0
        if not self.path.exists():
            return 0, 0
        with self.path.open("rb") as fh:
            while True:
                header = fh.read(_HEADER.size)
                if len(header) < _HEADER.size:
                    break
                length, crc = _HEADER.unpack(header)
                if length > MAX_RECORD_BYTES:
                    break
                payload = fh.read(length)
                if len(payload) < length or zlib.crc32(payload) != crc:
                    break
                count += 1
                end = fh.tell()
        return count, end

    def __len__(self) -> int:
        return self._count

    def append(self, report: common_pb2.FieldReport) -> int:
        """Durably appends one report; returns the buffer size after it."""
        payload = report.SerializeToString(deterministic=True)
        if len(payload) > MAX_RECORD_BYTES:
            raise ValueError(f"field report of {len(payload)} bytes exceeds the {MAX_RECORD_BYTES}-byte record limit")
        record = _HEADER.pack(len(payload), zlib.crc32(payload)) + payload
        with self._lock:
            self._file.write(record)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._count += 1
            return self._count

    def __iter__(self) -> Iterator[common_pb2.FieldReport]:
        """Every intact report, oldest first (a snapshot of what was durable when called)."""
        with self._lock:
            self._file.flush()
            count = self._count
        with self.path.open("rb") as fh:
            for _ in range(count):
                length, _crc = _HEADER.unpack(fh.read(_HEADER.size))
                yield common_pb2.FieldReport.FromString(fh.read(length))

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.close()


class ReplayFileError(ValueError):
    """A file that is not (or no longer) a readable replay buffer; the message names it."""


def read_replay_file(path: Path | str) -> tuple[list[common_pb2.FieldReport], int]:
    """Every intact report of a replay file, read-only (unlike `ReplayBuffer`, which cuts a torn
    tail); returns (reports, bytes after the last intact record).

    A file whose very first record is not intact is not a replay buffer (a foreign or corrupt file)
    and raises `ReplayFileError`; so does a record whose payload is not a FieldReport.
    """
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise ReplayFileError(f"{path}: cannot read ({exc.strerror})") from None
    reports: list[common_pb2.FieldReport] = []
    offset = 0
    while offset + _HEADER.size <= len(blob):
        length, crc = _HEADER.unpack_from(blob, offset)
        payload = blob[offset + _HEADER.size: offset + _HEADER.size + length]
        if length > MAX_RECORD_BYTES or len(payload) < length or zlib.crc32(payload) != crc:
            break
        try:
            reports.append(common_pb2.FieldReport.FromString(payload))
        except Exception as exc:  # protobuf's DecodeError; message only
            raise ReplayFileError(f"{path}: record {len(reports)} is not an esper.v1.FieldReport ({exc})") from None
        offset += _HEADER.size + length
    if not reports and blob:
        raise ReplayFileError(f"{path}: not a Tamiyo replay file (its first record has no valid length and CRC-32); "
                              f"expected a {FILE_NAME} written by Tamiyo or esper-tamiyo collect")
    return reports, len(blob) - offset
