// empty_cpu: large CPU tensors on transparent huge pages (see cpu_alloc.h).
#include "memory/cpu_alloc.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace neptune {
namespace {

constexpr size_t kHuge = size_t(2) << 20;  // x86-64 and arm64 (4 KiB base pages) huge page

bool env_off() {
  const char* v = std::getenv("NEPTUNE_CPU_HUGEPAGES");
  return v != nullptr && std::string(v) == "0";
}

bool thp_available() {
#if defined(__linux__)
  std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string mode;
  if (!f || !std::getline(f, mode)) return false;
  return mode.find("[never]") == std::string::npos;
#else
  return false;
#endif
}

#if defined(__linux__)
struct Mapping {
  void* base;
  size_t len;
};

std::atomic<size_t> g_mapped{0};

void unmap(void* ctx) {
  auto* m = static_cast<Mapping*>(ctx);
  const size_t now = g_mapped.fetch_sub(m->len) - m->len;
  c10::reportMemoryUsageToProfiler(m->base, -static_cast<int64_t>(m->len), now, now,
                                   c10::Device(c10::DeviceType::CPU));
  munmap(m->base, m->len);
  delete m;
}

// Buffers of kHuge bytes or more get their own mapping whose start is 2 MiB-aligned, so every
// whole 2 MiB of it can be one huge page (the tail past the last boundary has base pages).
// Smaller ones, and any mapping the kernel refuses, go to c10's CPU allocator.
struct HugePageAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (n < kHuge) return c10::GetDefaultCPUAllocator()->allocate(n);
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t len = (n + page - 1) / page * page;
    const size_t span = len + kHuge;
    char* raw = static_cast<char*>(
        mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (raw == MAP_FAILED) return c10::GetDefaultCPUAllocator()->allocate(n);
    const uintptr_t r = reinterpret_cast<uintptr_t>(raw);
    char* base = reinterpret_cast<char*>((r + kHuge - 1) / kHuge * kHuge);
    if (base > raw) munmap(raw, static_cast<size_t>(base - raw));
    const size_t tail = static_cast<size_t>(raw + span - (base + len));
    if (tail > 0) munmap(base + len, tail);
    madvise(base, len, MADV_HUGEPAGE);  // advice: without THP the pages are base pages
    const size_t now = g_mapped.fetch_add(len) + len;
    c10::reportMemoryUsageToProfiler(base, static_cast<int64_t>(len), now, now,
                                     c10::Device(c10::DeviceType::CPU));
    return {base, new Mapping{base, len}, &unmap, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};
#endif

}  // namespace

bool cpu_hugepages_enabled() {
#if defined(__linux__)
  static const bool on = !env_off() && thp_available();
  return on;
#else
  return false;
#endif
}

at::Tensor empty_cpu(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__)
  if (options.device().is_cpu() && options.layout() == c10::kStrided &&
      !options.pinned_memory() && cpu_hugepages_enabled()) {
    int64_t numel = 1;
    for (const int64_t s : sizes) numel = s < 0 ? -1 : numel * s;  // at::empty rejects < 0
    const size_t bytes = numel < 0 ? 0 : static_cast<size_t>(numel) * c10::elementSize(options.dtype().toScalarType());
    if (bytes >= kHuge) {
      static HugePageAllocator allocator;
      return at::Tensor(at::detail::empty_generic(sizes, &allocator,
                                                  c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                  options.dtype().toScalarType(), std::nullopt));
    }
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace neptune
