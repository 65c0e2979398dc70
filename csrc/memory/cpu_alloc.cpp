// empty_cpu: the kernels' large CPU buffers from a cache of mappings (see cpu_alloc.h).
#include "memory/cpu_alloc.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace neptune {
namespace {

constexpr size_t kCacheMinBytes = size_t(2) << 20;  // smaller buffers: c10's allocator
constexpr int64_t kCacheDefaultMB = 256;
constexpr size_t kCacheMaxEntries = 32;

int64_t limit_bytes() {
  static const int64_t limit = [] {
    const char* v = std::getenv("NEPTUNE_CPU_CACHE_MB");
    if (v == nullptr || *v == '\0') return kCacheDefaultMB << 20;
    char* end = nullptr;
    const long long mb = std::strtoll(v, &end, 10);
    if (end == v || *end != '\0' || mb < 0 || mb > (int64_t(1) << 30)) {
      TORCH_WARN("NEPTUNE_CPU_CACHE_MB must be a whole number of MiB >= 0 (0: no cache), got '", v,
                 "'; using ", kCacheDefaultMB);
      return kCacheDefaultMB << 20;
    }
    return static_cast<int64_t>(mb) << 20;
  }();
  return limit;
}

#if defined(__linux__)
struct Mapping {
  void* base;
  size_t len;
};

// The free mappings, oldest first. Never destroyed: tensors freed during exit still find it.
struct Cache {
  std::mutex mu;
  std::vector<Mapping> free;
  size_t held = 0;
  size_t in_use = 0;  // bytes of mappings tensors hold (for the profiler's totals)
};

std::atomic<Cache*> g_cache{nullptr};

// A forked child starts with a new, empty cache: another thread of the parent may have held
// the old one's lock at the fork. The old one's free mappings stay mapped in the child
// (copy-on-write pages it never touches).
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

void report(void* p, int64_t delta, const Cache& c) {
  c10::reportMemoryUsageToProfiler(p, delta, c.in_use, c.in_use + c.held,
                                   c10::Device(c10::DeviceType::CPU));
}

// A tensor's mapping comes back: kept while the cache stays within its limit (the oldest
// mappings leave first), else unmapped.
void release(void* ctx) {
  auto* m = static_cast<Mapping*>(ctx);
  Cache& c = cache();
  std::vector<Mapping> drop;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    c.in_use -= std::min(c.in_use, m->len);  // a forked child frees its parent's tensors too
    report(m->base, -static_cast<int64_t>(m->len), c);
    const size_t limit = static_cast<size_t>(limit_bytes());
    if (m->len <= limit) {
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
  }
  for (const Mapping& d : drop) munmap(d.base, d.len);  // outside the lock
  delete m;
}

struct CachingAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (n < kCacheMinBytes) return c10::GetDefaultCPUAllocator()->allocate(n);
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t len = (n + page - 1) / page * page;
    Cache& c = cache();
    {
      std::lock_guard<std::mutex> lock(c.mu);
      // the smallest free mapping that holds n bytes without wasting more than n
      size_t best = c.free.size();
      for (size_t i = 0; i < c.free.size(); ++i)
        if (c.free[i].len >= len && c.free[i].len <= 2 * len &&
            (best == c.free.size() || c.free[i].len < c.free[best].len))
          best = i;
      if (best < c.free.size()) {
        const Mapping m = c.free[best];
        c.free.erase(c.free.begin() + static_cast<std::ptrdiff_t>(best));
        c.held -= m.len;
        c.in_use += m.len;
        report(m.base, static_cast<int64_t>(m.len), c);
        return {m.base, new Mapping{m}, &release, c10::Device(c10::DeviceType::CPU)};
      }
    }
    void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {  // out of address space or memory: let the cache go and try again
      cpu_cache_clear();
      p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) return c10::GetDefaultCPUAllocator()->allocate(n);  // raises its OOM
    }
    std::lock_guard<std::mutex> lock(c.mu);
    c.in_use += len;
    report(p, static_cast<int64_t>(len), c);
    return {p, new Mapping{p, len}, &release, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};
#endif

}  // namespace

std::vector<int64_t> cpu_cache_info() {
#if defined(__linux__)
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return {limit_bytes(), static_cast<int64_t>(c.held)};
#else
  return {0, 0};
#endif
}

int64_t cpu_cache_clear() {
#if defined(__linux__)
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
#else
  return 0;
#endif
}

at::Tensor empty_cpu(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__)
  if (options.device().is_cpu() && options.layout() == c10::kStrided &&
      !options.pinned_memory() && limit_bytes() > 0) {
    int64_t numel = 1;
    for (const int64_t s : sizes) numel = s < 0 || numel < 0 ? -1 : numel * s;  // at::empty rejects < 0
    const size_t bytes =
        numel < 0 ? 0 : static_cast<size_t>(numel) * c10::elementSize(options.dtype().toScalarType());
    if (bytes >= kCacheMinBytes) {
      static CachingAllocator allocator;
      return at::Tensor(at::detail::empty_generic(sizes, &allocator,
                                                  c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                  options.dtype().toScalarType(), std::nullopt));
    }
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace neptune
