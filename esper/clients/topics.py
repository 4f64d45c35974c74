"""Oona topic names and content types used between Esper processes (the one list)."""

from __future__ import annotations

KERNEL_READY_TOPIC = "esper.kernel.ready"
LIFECYCLE_TOPIC = "esper.lifecycle"
DECISIONS_TOPIC = "esper.decisions"
METRICS_TOPIC = "esper.metrics"

_PROTO_CONTENT = "application/x-protobuf; type=esper.v1.{}"


def proto_content_type(type_name: str) -> str:
    """The content type of a payload that is a serialised ``esper.v1.<type_name>`` message."""
    return _PROTO_CONTENT.format(type_name)


KERNEL_READY_CONTENT_TYPE = proto_content_type("KernelReadyEvent")
