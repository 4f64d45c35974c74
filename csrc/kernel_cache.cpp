// Python binding of the kernel cache: `esper._C.KernelCache`, values are arbitrary Python objects.
//
// Locking: the GIL is held wherever a Python object is copied or destroyed (put, get, remove,
// clear); methods that only read C++ state release it, so threads waiting on the cache's mutex
// never hold the GIL while another thread needs it. Dropped values are destroyed after the
// cache's mutex is released (see kernel_cache.h).
#include "kernel_cache.h"

#include <torch/extension.h>

namespace py = pybind11;

namespace esper {

using PyKernelCache = KernelLruCache<py::object>;

namespace {

KernelKey make_key(std::string kernel_id, std::string device, std::string dtype) {
  return KernelKey{std::move(kernel_id), std::move(device), std::move(dtype)};
}

}  // namespace

void bind_kernel_cache(py::module_& m) {
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) {
        std::rethrow_exception(p);
      }
    } catch (const KernelNotCached& e) {
      PyErr_SetString(PyExc_KeyError, e.what());
    }
  });

  using release = py::call_guard<py::gil_scoped_release>;
  py::class_<PyKernelCache>(m, "KernelCache",
                            "LRU cache of loaded kernel artifacts keyed by (kernel_id, device, dtype), with a "
                            "byte budget, hit/miss/eviction counters and pinning. Thread-safe.")
      .def(py::init<int64_t>(), py::arg("byte_budget"),
           "A cache holding at most `byte_budget` bytes (as declared by `put`).")
      .def(
          "put",
          [](PyKernelCache& self, std::string kernel_id, std::string device, std::string dtype, py::object value,
             int64_t nbytes) {
            // Dropped values die here, with the GIL held and the cache unlocked.
            auto dropped = self.put(make_key(std::move(kernel_id), std::move(device), std::move(dtype)),
                                    std::move(value), nbytes);
          },
          py::arg("kernel_id"), py::arg("device"), py::arg("dtype"), py::arg("value"), py::arg("nbytes"),
          "Caches `value` as the most recently used entry, evicting least recently used unpinned entries to "
          "stay within the budget. Replacing a key keeps its pins. Raises ValueError if `nbytes` cannot fit "
          "even after evicting every unpinned entry.")
      .def(
          "get",
          [](PyKernelCache& self, const std::string& kernel_id, const std::string& device,
             const std::string& dtype) -> py::object {
            auto value = self.get(KernelKey{kernel_id, device, dtype});
            return value ? std::move(*value) : py::none();
          },
          py::arg("kernel_id"), py::arg("device"), py::arg("dtype"),
          "The cached value (a hit: the entry becomes the most recently used), or None (a miss).")
      .def(
          "contains",
          [](const PyKernelCache& self, std::string kernel_id, std::string device, std::string dtype) {
            return self.contains(make_key(std::move(kernel_id), std::move(device), std::move(dtype)));
          },
          py::arg("kernel_id"), py::arg("device"), py::arg("dtype"), release(),
          "Whether the key is cached; changes neither the LRU order nor the counters.")
      .def(
          "pin",
          [](PyKernelCache& self, std::string kernel_id, std::string device, std::string dtype) {
            return self.pin(make_key(std::move(kernel_id), std::move(device), std::move(dtype)));
          },
          py::arg("kernel_id"), py::arg("device"), py::arg("dtype"), release(),
          "Increments the entry's pin count (pinned entries are never evicted); returns the new count. "
          "KeyError if the key is not cached.")
      .def(
          "unpin",
          [](PyKernelCache& self, std::string kernel_id, std::string device, std::string dtype) {
            return self.unpin(make_key(std::move(kernel_id), std::move(device), std::move(dtype)));
          },
          py::arg("kernel_id"), py::arg("device"), py::arg("dtype"), release(),
          "Decrements the entry's pin count; returns the new count. KeyError if the key is not cached, "
          "ValueError if it is not pinned.")
      .def(
          "remove",
          [](PyKernelCache& self, std::string kernel_id, std::string device, std::string dtype) {
            auto value = self.remove(make_key(std::move(kernel_id), std::move(device), std::move(dtype)));
            return value.has_value();
          },
          py::arg("kernel_id"), py::arg("device"), py::arg("dtype"),
          "Removes an entry; returns whether it was cached. Raises ValueError if the entry is pinned.")
      .def(
          "stats",
          [](const PyKernelCache& self) {
            const KernelCacheStats s = self.stats();
            py::dict d;
            d["hits"] = s.hits;
            d["misses"] = s.misses;
            d["evictions"] = s.evictions;
            d["entries"] = s.entries;
            d["bytes"] = s.bytes;
            d["byte_budget"] = s.byte_budget;
            d["pinned_entries"] = s.pinned_entries;
            d["pinned_bytes"] = s.pinned_bytes;
            return d;
          },
          "Counters and occupancy: hits, misses, evictions, entries, bytes, byte_budget, pinned_entries, "
          "pinned_bytes.")
      .def(
          "keys",
          [](const PyKernelCache& self) {
            std::vector<KernelKey> keys;
            {
              py::gil_scoped_release no_gil;
              keys = self.keys();
            }
            py::list out;
            for (auto& k : keys) {
              out.append(py::make_tuple(k.kernel_id, k.device, k.dtype));
            }
            return out;
          },
          "Keys as (kernel_id, device, dtype) tuples, from most to least recently used.")
      .def(
          "clear", [](PyKernelCache& self) { auto dropped = self.clear(); },
          "Drops every entry (pinned ones included); the counters are kept.")
      .def("__len__", [](const PyKernelCache& self) { return self.size(); })
      .def("__repr__", [](const PyKernelCache& self) {
        const KernelCacheStats s = self.stats();
        return "KernelCache(entries=" + std::to_string(s.entries) + ", bytes=" + std::to_string(s.bytes) + "/" +
               std::to_string(s.byte_budget) + ", hits=" + std::to_string(s.hits) +
               ", misses=" + std::to_string(s.misses) + ", evictions=" + std::to_string(s.evictions) + ")";
      });
}

}  // namespace esper
