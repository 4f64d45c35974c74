"""Deterministic kernel ids: one id per (blueprint content, input shape, device, dtype)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from esper.v1 import common_pb2


def kernel_id_for(spec: common_pb2.BlueprintSpec, input_shape: Sequence[int], device: int, dtype: int) -> str:
    """``<blueprint_id>-v<version>-<24 hex>``, the hex digest covering the spec's content hash, the
    shape, the device and the dtype. Same inputs, same id, on every machine."""
    spec_hash = hashlib.sha256(spec.SerializeToString(deterministic=True)).hexdigest()
    key = "|".join([spec_hash, ",".join(str(int(d)) for d in input_shape),
                    common_pb2.DeviceType.Name(device), common_pb2.DType.Name(dtype)])
    return f"{spec.blueprint_id}-v{spec.version}-{hashlib.sha256(key.encode()).hexdigest()[:24]}"
