// LRU cache of loaded kernel artifacts keyed by (kernel id, device, dtype).
//
// Plain C++ (no Python): a hash map into a recency list, a byte budget, hit/miss/eviction
// counters and pin counts (a pinned entry is in use by a live seed and is never evicted). Every
// method takes the one mutex. Methods that drop values hand them back to the caller instead of
// destroying them under the lock, so a value whose destructor runs arbitrary code (a Python
// object's __del__) can never re-enter the cache while it is locked.
#pragma once

#include <cstdint>
#include <functional>
#include <list>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

namespace esper {

struct KernelKey {
  std::string kernel_id;
  std::string device;
  std::string dtype;

  bool operator==(const KernelKey& other) const {
    return kernel_id == other.kernel_id && device == other.device && dtype == other.dtype;
  }
  std::string describe() const { return "(" + kernel_id + ", " + device + ", " + dtype + ")"; }
};

struct KernelKeyHash {
  size_t operator()(const KernelKey& k) const noexcept {
    const std::hash<std::string> h;
    size_t seed = h(k.kernel_id);
    seed ^= h(k.device) + 0x9e3779b97f4a7c15ULL + (seed << 6) + (seed >> 2);
    seed ^= h(k.dtype) + 0x9e3779b97f4a7c15ULL + (seed << 6) + (seed >> 2);
    return seed;
  }
};

// Thrown when an operation names a key that is not cached (maps to Python KeyError).
class KernelNotCached : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Thrown for a request the cache refuses (maps to Python ValueError).
class KernelCacheRefused : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

struct KernelCacheStats {
  uint64_t hits = 0;
  uint64_t misses = 0;
  uint64_t evictions = 0;
  int64_t entries = 0;
  int64_t bytes = 0;
  int64_t byte_budget = 0;
  int64_t pinned_entries = 0;
  int64_t pinned_bytes = 0;
};

template <typename Value>
class KernelLruCache {
 public:
  explicit KernelLruCache(int64_t byte_budget) : budget_(byte_budget) {
    if (byte_budget < 0) {
      throw KernelCacheRefused("KernelCache: byte_budget must be >= 0, got " + std::to_string(byte_budget));
    }
  }

  // Inserts or replaces `key` as the most recently used entry, evicting least recently used
  // unpinned entries until the budget holds. Returns the values it dropped (evicted entries and a
  // replaced value) for the caller to destroy outside the lock. A replaced entry keeps its pins.
  std::vector<Value> put(KernelKey key, Value value, int64_t nbytes) {
    if (nbytes < 0) {
      throw KernelCacheRefused("KernelCache.put: nbytes must be >= 0, got " + std::to_string(nbytes));
    }
    std::vector<Value> dropped;
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = index_.find(key);
    const bool replacing = found != index_.end();
    const int64_t pinned_elsewhere =
        pinned_bytes_ - (replacing && found->second->pins > 0 ? found->second->nbytes : 0);
    if (nbytes > budget_ - pinned_elsewhere) {
      throw KernelCacheRefused("KernelCache.put: kernel " + key.describe() + " needs " + std::to_string(nbytes) +
                               " bytes but only " + std::to_string(budget_ - pinned_elsewhere) + " of the budget of " +
                               std::to_string(budget_) + " bytes can be freed (the rest is pinned)");
    }
    if (replacing) {
      auto it = found->second;
      account(*it, -1);
      dropped.push_back(std::move(it->value));
      it->value = std::move(value);
      it->nbytes = nbytes;
      account(*it, +1);
      order_.splice(order_.begin(), order_, it);
    } else {
      order_.push_front(Entry{key, std::move(value), nbytes, 0});
      index_.emplace(std::move(key), order_.begin());
      bytes_ += nbytes;
    }
    // Evict from the least recent end; the new entry is at the front and pinned entries stay.
    for (auto it = std::prev(order_.end()); bytes_ > budget_ && it != order_.begin();) {
      auto victim = it--;
      if (victim->pins > 0) {
        continue;
      }
      bytes_ -= victim->nbytes;
      dropped.push_back(std::move(victim->value));
      index_.erase(victim->key);
      order_.erase(victim);
      ++evictions_;
    }
    return dropped;
  }

  // The cached value (and the entry becomes the most recently used), or nothing on a miss.
  std::optional<Value> get(const KernelKey& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = index_.find(key);
    if (found == index_.end()) {
      ++misses_;
      return std::nullopt;
    }
    ++hits_;
    order_.splice(order_.begin(), order_, found->second);
    return found->second->value;
  }

  bool contains(const KernelKey& key) const {
    std::lock_guard<std::mutex> lock(mutex_);
    return index_.count(key) != 0;
  }

  // Returns the new pin count.
  int64_t pin(const KernelKey& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    Entry& e = find_or_throw(key, "pin");
    if (e.pins++ == 0) {
      pinned_bytes_ += e.nbytes;
      ++pinned_entries_;
    }
    return e.pins;
  }

  int64_t unpin(const KernelKey& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    Entry& e = find_or_throw(key, "unpin");
    if (e.pins == 0) {
      throw KernelCacheRefused("KernelCache.unpin: kernel " + key.describe() + " is not pinned");
    }
    if (--e.pins == 0) {
      pinned_bytes_ -= e.nbytes;
      --pinned_entries_;
    }
    return e.pins;
  }

  // Removes an unpinned entry; returns its value (nothing when absent). Refuses a pinned one.
  std::optional<Value> remove(const KernelKey& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = index_.find(key);
    if (found == index_.end()) {
      return std::nullopt;
    }
    auto it = found->second;
    if (it->pins > 0) {
      throw KernelCacheRefused("KernelCache.remove: kernel " + key.describe() + " is pinned " +
                               std::to_string(it->pins) + " time(s); unpin it first");
    }
    std::optional<Value> value(std::move(it->value));
    bytes_ -= it->nbytes;
    index_.erase(found);
    order_.erase(it);
    return value;
  }

  // Drops every entry, pinned ones included, and keeps the counters. Returns the values.
  std::vector<Value> clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<Value> dropped;
    dropped.reserve(order_.size());
    for (auto& e : order_) {
      dropped.push_back(std::move(e.value));
    }
    order_.clear();
    index_.clear();
    bytes_ = pinned_bytes_ = pinned_entries_ = 0;
    return dropped;
  }

  KernelCacheStats stats() const {
    std::lock_guard<std::mutex> lock(mutex_);
    KernelCacheStats s;
    s.hits = hits_;
    s.misses = misses_;
    s.evictions = evictions_;
    s.entries = static_cast<int64_t>(order_.size());
    s.bytes = bytes_;
    s.byte_budget = budget_;
    s.pinned_entries = pinned_entries_;
    s.pinned_bytes = pinned_bytes_;
    return s;
  }

  // Keys from most to least recently used.
  std::vector<KernelKey> keys() const {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<KernelKey> out;
    out.reserve(order_.size());
    for (const auto& e : order_) {
      out.push_back(e.key);
    }
    return out;
  }

  size_t size() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return order_.size();
  }

 private:
  struct Entry {
    KernelKey key;
    Value value;
    int64_t nbytes;
    int64_t pins;
  };

  void account(const Entry& e, int sign) {
    bytes_ += sign * e.nbytes;
    if (e.pins > 0) {
      pinned_bytes_ += sign * e.nbytes;
    }
  }

  Entry& find_or_throw(const KernelKey& key, const char* method) {
    auto found = index_.find(key);
    if (found == index_.end()) {
      throw KernelNotCached(std::string("KernelCache.") + method + ": kernel " + key.describe() + " is not cached");
    }
    return *found->second;
  }

  const int64_t budget_;
  std::list<Entry> order_;  // front = most recently used
  std::unordered_map<KernelKey, typename std::list<Entry>::iterator, KernelKeyHash> index_;
  int64_t bytes_ = 0;
  int64_t pinned_bytes_ = 0;
  int64_t pinned_entries_ = 0;
  uint64_t hits_ = 0;
  uint64_t misses_ = 0;
  uint64_t evictions_ = 0;
  mutable std::mutex mutex_;
};

}  // namespace esper
