"""`KernelStore`: the kernels a run has loaded, in the Kasmina `KernelCache` (bytes accounted), and
their verified bytes in the run directory (``kernels/<kernel id>.pt2``), so a resume gets back the
very kernel a seed ran without fetching or compiling it again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from esper.durable import write_bytes_atomic
from esper.kasmina import KernelCache, adopt_kernel, cache_key
from esper.v1 import common_pb2

KERNEL_CACHE_BYTES = 256 << 20
_DEVICE_TYPES = {"cpu": common_pb2.DEVICE_TYPE_CPU, "cuda": common_pb2.DEVICE_TYPE_CUDA}
_DTYPES = {torch.float32: common_pb2.D_TYPE_FLOAT32, torch.float64: common_pb2.D_TYPE_FLOAT64,
           torch.float16: common_pb2.D_TYPE_FLOAT16, torch.bfloat16: common_pb2.D_TYPE_BFLOAT16}
_KERNEL_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")


class KernelStore:
    """Loaded kernels by (kernel id, device, dtype), plus their bytes on disk."""

    def __init__(self, directory: Path, byte_budget: int = KERNEL_CACHE_BYTES):
        self.directory = Path(directory)
        self.cache = KernelCache(byte_budget)

    def restore_seeds(self, sites: list[tuple[str, Any]], model_state: dict[str, Any], device: torch.device) -> None:
        """Before a checkpoint's `model_state` loads: each seed that ran a compiled kernel gets that
        kernel back from this run's verified copy; without the copy Kasmina builds the seed from its
        blueprint, which loads the same weights."""
        for name, layer in sites:
            for index, (kernel_id, spec) in layer.checkpointed_kernels(model_state, f"{name}.").items():
                loaded = self.load_local(kernel_id)
                if loaded is not None:
                    layer.preload_seed(index, adopt_kernel(loaded.to(device), spec.blueprint_id))

    def get(self, kernel_id: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module | None:
        return self.cache.get(*cache_key(kernel_id, device, dtype))

    def put(self, kernel_id: str, device: torch.device, dtype: torch.dtype, module: torch.nn.Module,
            nbytes: int) -> None:
        self.cache.put(*cache_key(kernel_id, device, dtype), module, nbytes)

    def path(self, kernel_id: str) -> Path:
        # kernel ids are ``<blueprint>-v<n>-<hex>`` made by us (kernel_id_for); refuse anything else.
        if not kernel_id or any(c not in _KERNEL_ID_CHARS for c in kernel_id):
            raise ValueError(f"kernel id {kernel_id!r} is not a kernel id made by esper.tezzeret.kernel_id_for")
        return self.directory / f"{kernel_id}.pt2"

    def save_bytes(self, kernel_id: str, data: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(self.path(kernel_id), data)

    def load_local(self, kernel_id: str) -> torch.nn.Module | None:
        """The module from this run's own verified copy, or None (no copy, or not a kernel id)."""
        from esper.tezzeret import load_kernel_artifact

        try:
            data = self.path(kernel_id).read_bytes()
        except (OSError, ValueError):
            return None
        return load_kernel_artifact(data)

    def stats(self) -> dict[str, int]:
        return dict(self.cache.stats())


def kernel_target(layer: Any, output_shape: list[int] | None, device: torch.device) -> tuple[list[int], int, int]:
    """(input shape with dynamic batch, device enum, dtype enum) a kernel for `layer`'s seeds is
    compiled for: one seed's chunk of the layer's output (spatial dims from `output_shape`)."""
    out = output_shape or [-1, layer.chunk_size]
    shape = [-1, int(layer.chunk_size), *[int(d) for d in out[2:]]]
    return shape, _DEVICE_TYPES[device.type], _DTYPES.get(layer.seed_dtype(), common_pb2.D_TYPE_FLOAT32)
