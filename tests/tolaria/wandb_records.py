"""Reads the records of an offline W&B run file (`run-<id>.wandb`), for tests.

The file is a ':W&B' header (magic 0xBEE1, version 0) followed by a LevelDB-style log: 32 KiB
blocks of chunks, each `crc32c(4) length(2, little-endian) type(1) data`, where a record is one
FULL chunk or FIRST, MIDDLE..., LAST; each record is a serialised `wandb_internal_pb2.Record`.
wandb 0.31 ships no Python reader for it (its Go core writes it), so the test reads it directly.
"""

from __future__ import annotations

import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    """Every record of the run file as `wandb.proto.wandb_internal_pb2.Record`, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B" or struct.unpack("<H", data[4:6])[0] != 0xBEE1:
        raise ValueError(f"{path} is not a W&B run file (header {data[:7]!r})")
    pos = HEADER
    pending = b""
    records = []
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:
            pos += left_in_block  # block trailer padding
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue  # zero padding
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        else:
            pending += chunk
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        records.append(record)
        pending = b""
    return records


def history_rows(path: Path) -> list[dict[str, str]]:
    """The logged rows (history records) as {key: json value text}."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return rows


def summary_values(path: Path) -> dict[str, str]:
    """The last value of every summary key written to the run file."""
    out: dict[str, str] = {}
    for record in read_records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                out[item.key or "/".join(item.nested_key)] = item.value_json
    return out


def config_values(path: Path) -> dict[str, str]:
    """The run config keys written to the run file (top level)."""
    out: dict[str, str] = {}
    for record in read_records(path):
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                out[item.key or "/".join(item.nested_key)] = item.value_json
    return out
