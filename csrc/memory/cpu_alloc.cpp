// empty_cpu: the kernels' large CPU buffers from a cache of mappings (see cpu_alloc.h).
#include "memory/cpu_alloc.h"

#include <ATen/Context.h>
#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace neptune {

#if defined(__linux__)
namespace {

constexpr size_t kCacheMinBytes = size_t(2) << 20;  // smaller buffers: c10's allocator
constexpr int64_t kCacheDefaultMB = 256;
constexpr size_t kCacheMaxEntries = 32;

// NEPTUNE_CPU_CACHE_MB, read once. A value that is not a whole number of MiB turns the cache
// off (with a warning): the variable is mostly set to switch it off.
int64_t limit_bytes() {
  static const int64_t limit = [] {
    const char* v = std::getenv("NEPTUNE_CPU_CACHE_MB");
    if (v == nullptr || *v == '\0') return kCacheDefaultMB << 20;
    char* end = nullptr;
    const long long mb = std::strtoll(v, &end, 10);
    if (end == v || *end != '\0' || mb < 0 || mb > (int64_t(1) << 30)) {
      TORCH_WARN("NEPTUNE_CPU_CACHE_MB must be a whole number of MiB >= 0 (0: no cache), got '", v,
                 "'; the CPU buffer cache is off");
      return int64_t(0);
    }
    return static_cast<int64_t>(mb) << 20;
  }();
  return limit;
}

// NEPTUNE_CPU_CACHE_POISON=1 (tests): every buffer handed out, new or reused, is filled with
// 0xFF bytes (NaN in floating point, -1 in integers) so a kernel reading what it did not write
// shows it.
bool poison() {
  static const bool on = [] {
    const char* v = std::getenv("NEPTUNE_CPU_CACHE_POISON");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return on;
}

struct Mapping {
  void* base;
  size_t len;
};

// The free mappings, oldest first. Never destroyed: tensors freed during exit still find it.
struct Cache {
  std::mutex mu;
  std::vector<Mapping> free;
  size_t held = 0;
};

std::atomic<Cache*> g_cache{nullptr};

// A forked child starts with a new, empty cache: another thread of the parent may have held
// the old one's lock at the fork, and the free mappings are not in the child (MADV_DONTFORK).
void fresh_cache_in_child() { g_cache.store(new Cache); }

Cache& cache() {
  static const bool once = [] {
    g_cache.store(new Cache);
    pthread_atfork(nullptr, nullptr, &fresh_cache_in_child);
    return true;
  }();
  (void)once;
  return *g_cache.load();
}

// A tensor's mapping comes back: kept while the cache stays within its limit (the oldest
// mappings leave first), else unmapped. A kept mapping is left out of forked children.
void release(void* ctx) {
  auto* m = static_cast<Mapping*>(ctx);
  c10::profiledCPUMemoryReporter().Delete(m->base);
  Cache& c = cache();
  const size_t limit = static_cast<size_t>(limit_bytes());
  std::vector<Mapping> drop;
  if (m->len <= limit) {
    madvise(m->base, m->len, MADV_DONTFORK);
    std::lock_guard<std::mutex> lock(c.mu);
    c.free.push_back(*m);
    c.held += m->len;
    while (c.held > limit || c.free.size() > kCacheMaxEntries) {
      drop.push_back(c.free.front());
      c.held -= c.free.front().len;
      c.free.erase(c.free.begin());
    }
  } else {
    drop.push_back(*m);
  }
  for (const Mapping& d : drop) munmap(d.base, d.len);  // outside the lock
  delete m;
}

c10::DataPtr hand_out(const Mapping& m, size_t n) {
  if (poison()) std::memset(m.base, 0xFF, m.len);
  c10::profiledCPUMemoryReporter().New(m.base, n);
  return {m.base, new Mapping{m}, &release, c10::Device(c10::DeviceType::CPU)};
}

struct CachingAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (n < kCacheMinBytes) return c10::GetDefaultCPUAllocator()->allocate(n);
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t len = (n + page - 1) / page * page;
    Cache& c = cache();
    bool found = false;
    Mapping m{nullptr, 0};
    {
      std::lock_guard<std::mutex> lock(c.mu);
      // the smallest free mapping that holds n bytes without wasting more than n
      size_t best = c.free.size();
      for (size_t i = 0; i < c.free.size(); ++i)
        if (c.free[i].len >= len && c.free[i].len <= 2 * len &&
            (best == c.free.size() || c.free[i].len < c.free[best].len))
          best = i;
      if (best < c.free.size()) {
        m = c.free[best];
        c.free.erase(c.free.begin() + static_cast<std::ptrdiff_t>(best));
        c.held -= m.len;
        found = true;
      }
    }
    if (found) {
      madvise(m.base, m.len, MADV_DOFORK);  // in use again: a forked child shares it as usual
      return hand_out(m, n);
    }
    void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {  // out of address space or memory: let the cache go and try again
      cpu_cache_clear();
      p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) return c10::GetDefaultCPUAllocator()->allocate(n);  // raises its OOM
    }
    return hand_out({p, len}, n);
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

}  // namespace

std::vector<int64_t> cpu_cache_info() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return {limit_bytes(), static_cast<int64_t>(c.held)};
}

int64_t cpu_cache_clear() {
  Cache& c = cache();
  std::vector<Mapping> drop;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    drop.swap(c.free);
    c.held = 0;
  }
  int64_t bytes = 0;
  for (const Mapping& d : drop) {
    munmap(d.base, d.len);
    bytes += static_cast<int64_t>(d.len);
  }
  return bytes;
}

at::Tensor empty_cpu(at::IntArrayRef sizes, const at::TensorOptions& options) {
  // at::empty's own memory under torch.use_deterministic_algorithms, which fills new tensors
  // (fill_uninitialized_memory) to expose reads of what was never written
  const auto& ctx = at::globalContext();
  if (options.device().is_cpu() && options.layout() == c10::kStrided &&
      !options.pinned_memory() && limit_bytes() > 0 &&
      !(ctx.deterministicAlgorithms() && ctx.deterministicFillUninitializedMemory())) {
    const size_t item = c10::elementSize(options.dtype().toScalarType());
    size_t bytes = item;
    for (const int64_t s : sizes) {
      if (s < 0 || __builtin_mul_overflow(bytes, static_cast<size_t>(s), &bytes)) {
        bytes = 0;  // at::empty reports it
        break;
      }
    }
    if (bytes >= kCacheMinBytes) {
      static CachingAllocator* allocator = new CachingAllocator;  // outlives every tensor
      return at::Tensor(at::detail::empty_generic(sizes, allocator,
                                                  c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                  options.dtype().toScalarType(), std::nullopt));
    }
  }
  return at::empty(sizes, options);
}

#else  // not Linux: no cache

std::vector<int64_t> cpu_cache_info() { return {0, 0}; }

int64_t cpu_cache_clear() { return 0; }

at::Tensor empty_cpu(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}

#endif

}  // namespace neptune
