"""The C++ kernel cache (esper._C.KernelCache) through its Python interface."""

import gc
import threading
import weakref

import pytest
import torch

from esper.kasmina.kernel_cache import KernelCache, cache_key

F32 = "torch.float32"


def names(cache):
    """Kernel ids from most to least recently used."""
    keys = cache.keys()
    return [k[0] for k in keys]


def test_get_hit_and_miss_update_counters():
    cache = KernelCache(1000)
    value = object()
    cache.put("k1", "cpu", F32, value, 10)
    assert cache.get("k1", "cpu", F32) is value
    assert cache.get("k1", "cpu", "torch.float64") is None  # dtype is part of the key
    assert cache.get("k1", "cuda:0", F32) is None  # so is the device
    assert cache.get("nope", "cpu", F32) is None
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["evictions"]) == (1, 3, 0)
    assert (stats["entries"], stats["bytes"], stats["byte_budget"]) == (1, 10, 1000)
    assert len(cache) == 1


def test_lru_order_and_eviction():
    cache = KernelCache(30)
    for name in "abc":
        cache.put(name, "cpu", F32, name.upper(), 10)
    assert cache.keys() == [("c", "cpu", F32), ("b", "cpu", F32), ("a", "cpu", F32)]
    assert cache.get("a", "cpu", F32) == "A"  # a becomes most recent, b is now least recent
    assert names(cache) == ["a", "c", "b"]
    cache.put("d", "cpu", F32, "D", 10)
    assert names(cache) == ["d", "a", "c"]
    assert not cache.contains("b", "cpu", F32)
    assert cache.stats()["evictions"] == 1
    # A big entry evicts as many least recent entries as it needs, and no more.
    cache.put("e", "cpu", F32, "E", 20)
    assert names(cache) == ["e", "d"]
    assert cache.stats()["evictions"] == 3 and cache.stats()["bytes"] == 30


def test_contains_changes_neither_order_nor_counters():
    cache = KernelCache(100)
    cache.put("a", "cpu", F32, 1, 1)
    cache.put("b", "cpu", F32, 2, 1)
    before = cache.stats()
    assert cache.contains("a", "cpu", F32) and not cache.contains("z", "cpu", F32)
    assert cache.stats() == before
    assert names(cache) == ["b", "a"]


def test_byte_budget_is_never_exceeded():
    cache = KernelCache(100)
    sizes = [7, 30, 1, 55, 12, 90, 3, 40, 0, 100]
    for i, size in enumerate(sizes):
        cache.put(f"k{i}", "cpu", F32, i, size)
        stats = cache.stats()
        assert stats["bytes"] <= 100
        assert stats["bytes"] == sum(sizes[int(name[1:])] for name in names(cache))
    with pytest.raises(ValueError, match="needs 101 bytes"):
        cache.put("huge", "cpu", F32, None, 101)
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        cache.put("neg", "cpu", F32, None, -1)
    with pytest.raises(ValueError, match="byte_budget must be >= 0"):
        KernelCache(-5)


def test_replacing_a_key_updates_value_and_bytes():
    cache = KernelCache(100)
    cache.put("a", "cpu", F32, "old", 40)
    cache.put("b", "cpu", F32, "b", 40)
    cache.put("a", "cpu", F32, "new", 70)  # replaces a (40 -> 70), so b must go
    assert cache.get("a", "cpu", F32) == "new"
    assert cache.keys() == [("a", "cpu", F32)]
    stats = cache.stats()
    assert (stats["bytes"], stats["entries"], stats["evictions"]) == (70, 1, 1)


def test_pinned_entries_are_never_evicted():
    cache = KernelCache(30)
    cache.put("pinned", "cpu", F32, "P", 10)
    assert cache.pin("pinned", "cpu", F32) == 1
    assert cache.pin("pinned", "cpu", F32) == 2
    for i in range(10):
        cache.put(f"k{i}", "cpu", F32, i, 10)
    assert cache.contains("pinned", "cpu", F32)
    assert cache.keys()[-1] == ("pinned", "cpu", F32)  # least recent, yet still here
    stats = cache.stats()
    assert stats["pinned_entries"] == 1 and stats["pinned_bytes"] == 10 and stats["bytes"] == 30
    # Only 20 bytes can ever be freed now.
    with pytest.raises(ValueError, match="pinned"):
        cache.put("big", "cpu", F32, None, 25)
    assert cache.stats()["entries"] == 3  # a refused put evicts nothing
    with pytest.raises(ValueError, match="unpin it first"):
        cache.remove("pinned", "cpu", F32)
    assert cache.unpin("pinned", "cpu", F32) == 1
    assert cache.unpin("pinned", "cpu", F32) == 0
    with pytest.raises(ValueError, match="not pinned"):
        cache.unpin("pinned", "cpu", F32)
    cache.put("big", "cpu", F32, None, 25)  # now it may evict the formerly pinned entry
    assert cache.keys() == [("big", "cpu", F32)]


def test_replacing_a_pinned_entry_keeps_its_pin():
    cache = KernelCache(50)
    cache.put("a", "cpu", F32, 1, 10)
    cache.pin("a", "cpu", F32)
    cache.put("a", "cpu", F32, 2, 30)
    assert cache.stats()["pinned_bytes"] == 30
    cache.put("b", "cpu", F32, 3, 20)
    cache.put("c", "cpu", F32, 4, 20)  # must evict b, never a
    assert set(names(cache)) == {"a", "c"}
    assert cache.get("a", "cpu", F32) == 2


def test_pin_unpin_absent_raise_key_error():
    cache = KernelCache(10)
    with pytest.raises(KeyError, match="is not cached"):
        cache.pin("x", "cpu", F32)
    with pytest.raises(KeyError, match="is not cached"):
        cache.unpin("x", "cpu", F32)


def test_remove_and_clear():
    cache = KernelCache(100)
    cache.put("a", "cpu", F32, 1, 10)
    cache.put("b", "cpu", F32, 2, 10)
    assert cache.remove("a", "cpu", F32) is True
    assert cache.remove("a", "cpu", F32) is False
    assert cache.stats()["bytes"] == 10
    cache.get("b", "cpu", F32)
    cache.pin("b", "cpu", F32)
    cache.clear()
    stats = cache.stats()
    assert stats["entries"] == 0 and stats["bytes"] == 0 and stats["pinned_entries"] == 0
    assert stats["hits"] == 1  # counters survive clear()


def test_cache_holds_and_releases_python_references():
    class Artifact:
        pass

    cache = KernelCache(10)
    art = Artifact()
    ref = weakref.ref(art)
    cache.put("a", "cpu", F32, art, 10)
    del art
    gc.collect()
    assert ref() is not None  # the cache keeps the object alive
    cache.put("b", "cpu", F32, object(), 10)  # evicts a
    gc.collect()
    assert ref() is None  # and lets it go when evicted


def test_value_destructor_may_reenter_the_cache():
    # An evicted value's __del__ runs after the cache unlocked itself, so it can use the cache.
    cache = KernelCache(10)
    seen = []

    class Reentrant:
        def __del__(self):
            seen.append(cache.contains("b", "cpu", F32))
            seen.append(cache.stats()["entries"])

    cache.put("a", "cpu", F32, Reentrant(), 10)
    cache.put("b", "cpu", F32, "B", 10)
    assert seen == [True, 1]


def test_cache_key_canonical_strings():
    assert cache_key("k", "cpu", torch.float32) == ("k", "cpu", "torch.float32")
    assert cache_key("k", torch.device("cuda", 1), torch.bfloat16) == ("k", "cuda:1", "torch.bfloat16")


def test_thread_safety_smoke():
    cache = KernelCache(64 * 10)
    errors = []
    barrier = threading.Barrier(6)

    def worker(tid):
        try:
            barrier.wait()
            for i in range(3000):
                key = f"k{(i * 7 + tid) % 100}"
                if cache.get(key, "cpu", F32) is None:
                    cache.put(key, "cpu", F32, (tid, i), 10)
                if i % 97 == 0:
                    cache.contains(key, "cpu", F32)
                    cache.keys()
                    try:
                        cache.pin(key, "cpu", F32)
                        cache.unpin(key, "cpu", F32)
                    except KeyError:
                        pass  # evicted by another thread in between: allowed
                assert cache.stats()["bytes"] <= 640
        except Exception as exc:  # noqa: BLE001 - reported to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stats = cache.stats()
    assert stats["hits"] + stats["misses"] == 6 * 3000
    assert stats["entries"] == len(cache.keys()) <= 64
    assert stats["bytes"] == 10 * stats["entries"]
    assert stats["pinned_entries"] == 0
