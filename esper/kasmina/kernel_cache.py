"""The kernel cache: an LRU of loaded kernel artifacts, keyed by (kernel_id, device, dtype).

`KernelCache` is the C++ class `esper._C.KernelCache` itself (a Python subclass would put an
interpreter frame on every lookup, and a hit must stay well under a microsecond):

    KernelCache(byte_budget)
    put(kernel_id, device, dtype, value, nbytes)   evicts LRU unpinned entries; ValueError if it cannot fit
    get(kernel_id, device, dtype) -> value | None  a hit makes the entry the most recently used
    contains(kernel_id, device, dtype) -> bool     no LRU or counter change
    pin(...) / unpin(...) -> pin count             pinned entries are never evicted; KeyError if absent
    remove(...) -> bool                            ValueError if pinned
    stats() -> dict                                hits, misses, evictions, entries, bytes, byte_budget,
                                                   pinned_entries, pinned_bytes
    keys() -> [(kernel_id, device, dtype)]         most to least recently used
    clear()

Keys are strings; `cache_key` builds the canonical (device, dtype) strings from torch objects so
that every caller spells them the same way ("cuda:0", "torch.float32").
"""

from __future__ import annotations

import torch

from esper._extension import load

KernelCache = load().KernelCache


def cache_key(kernel_id: str, device: torch.device | str, dtype: torch.dtype | str) -> tuple[str, str, str]:
    """Canonical (kernel_id, device, dtype) strings for a kernel on ``device`` in ``dtype``."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return kernel_id, str(dev), str(dtype)


__all__ = ["KernelCache", "cache_key"]
