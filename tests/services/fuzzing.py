"""Garbage and edge-case requests for any gRPC method, built from its protobuf descriptors.

`edge_case_message(descriptor, rng)` fills a message with values chosen to hurt: empty and huge
strings, path-like and non-ASCII text, zero, negative and extreme numbers, NaN and infinities,
enum numbers no server knows, long repeated fields, nested messages a few levels deep.
`garbage_bytes(rng)` is raw bytes that rarely parse at all. A fixed seed replays a run.
"""

from __future__ import annotations

import math
import random

from google.protobuf import descriptor as d
from google.protobuf import message_factory

_STRINGS = ["", "x", "../../etc/passwd", "a" * 7000, "\x00", "ü" * 300, "-1", "9" * 25, " ", "A/B", "esper.t",
            "residual_mlp", "job-0000000000000000", "0", "\u202e\ud7ff", "%s%n"]
_INTS = [0, 1, -1, 2, 3, 7, 1 << 31, -(1 << 31), (1 << 63) - 1, -(1 << 63), 10**12, 4096, 30000]
_FLOATS = [0.0, -0.0, 1.0, -1.0, math.nan, math.inf, -math.inf, 1e308, 5e-324, 0.05, 1e9]
_BYTES = [b"", b"\x00", b"\xff" * 64, bytes(range(256))]

_INT_TYPES = {d.FieldDescriptor.TYPE_INT32: 32, d.FieldDescriptor.TYPE_SINT32: 32, d.FieldDescriptor.TYPE_SFIXED32: 32,
              d.FieldDescriptor.TYPE_INT64: 64, d.FieldDescriptor.TYPE_SINT64: 64,
              d.FieldDescriptor.TYPE_SFIXED64: 64}
_UINT_TYPES = {d.FieldDescriptor.TYPE_UINT32: 32, d.FieldDescriptor.TYPE_FIXED32: 32,
               d.FieldDescriptor.TYPE_UINT64: 64, d.FieldDescriptor.TYPE_FIXED64: 64}


def _scalar(field: d.FieldDescriptor, rng: random.Random):
    t = field.type
    if t == d.FieldDescriptor.TYPE_STRING:
        return rng.choice(_STRINGS)
    if t == d.FieldDescriptor.TYPE_BYTES:
        return rng.choice(_BYTES)
    if t == d.FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if t in (d.FieldDescriptor.TYPE_DOUBLE, d.FieldDescriptor.TYPE_FLOAT):
        value = rng.choice(_FLOATS)
        return value if t == d.FieldDescriptor.TYPE_DOUBLE or not math.isfinite(value) or abs(value) < 3e38 else 1.0
    if t == d.FieldDescriptor.TYPE_ENUM:
        return rng.choice([*(v.number for v in field.enum_type.values), 99, -5, 1 << 20])
    if t in _INT_TYPES:
        bits = _INT_TYPES[t]
        value = rng.choice(_INTS)
        return max(-(1 << (bits - 1)), min((1 << (bits - 1)) - 1, value))
    if t in _UINT_TYPES:
        return max(0, min((1 << _UINT_TYPES[t]) - 1, rng.choice(_INTS)))
    raise AssertionError(f"unhandled field type {t} of {field.full_name}")


def fill(message, rng: random.Random, depth: int = 0) -> None:
    """Set a random subset of `message`'s fields to edge-case values (in place)."""
    for field in message.DESCRIPTOR.fields:
        if rng.random() < 0.4:
            continue
        is_message = field.type == d.FieldDescriptor.TYPE_MESSAGE
        if field.is_repeated:
            if is_message and field.message_type.GetOptions().map_entry:
                target = getattr(message, field.name)
                key_f, value_f = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
                for _ in range(rng.choice([0, 1, 3, 70])):
                    key = _scalar(key_f, rng)
                    if value_f.type == d.FieldDescriptor.TYPE_MESSAGE:
                        fill(target[key], rng, depth + 1)
                    else:
                        target[key] = _scalar(value_f, rng)
                continue
            count = rng.choice([0, 1, 2, 9, 1200]) if depth < 2 else rng.choice([0, 1])
            target = getattr(message, field.name)
            for _ in range(count):
                if is_message:
                    if depth < 3:
                        fill(target.add(), rng, depth + 1)
                else:
                    target.append(_scalar(field, rng))
        elif is_message:
            if depth < 3:
                fill(getattr(message, field.name), rng, depth + 1)
                if not getattr(message, field.name).ByteSize() and rng.random() < 0.5:
                    getattr(message, field.name).SetInParent()
        else:
            setattr(message, field.name, _scalar(field, rng))


def edge_case_message(descriptor: d.Descriptor, rng: random.Random):
    """A new message of `descriptor`'s type with edge-case values."""
    message = message_factory.GetMessageClass(descriptor)()
    fill(message, rng)
    return message


def garbage_bytes(rng: random.Random) -> bytes:
    """Bytes that are usually not a valid message: random, truncated varints, bad wire types."""
    kind = rng.randrange(5)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 64, 900])))
    if kind == 1:
        return b"\x0a\xff\xff\xff\xff\x0f"  # a length prefix far past the end
    if kind == 2:
        return b"\x08" + b"\xff" * 11  # an over-long varint
    if kind == 3:
        return bytes([0x0F, 0x00])  # wire type 7 does not exist
    return b"\x12\x05abc"  # length-delimited field cut short
