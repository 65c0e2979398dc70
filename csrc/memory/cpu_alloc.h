// A cache for the kernels' large CPU buffers (host code).
//
// A kernel's large output or scratch buffer is written in full right after it is allocated.
// From the C library such a block is a fresh anonymous mapping on every call (glibc maps
// blocks this large on their own and unmaps them on free), so each of its 4 KiB pages costs a
// page fault and the kernel's zeroing on first touch: on the 2-core VMs about a fifth of a
// sampled mini-batch step, whose buffers are tens of MB each and allocated anew every step.
// empty_cpu keeps the mappings of freed large buffers (up to a byte limit) and hands them out
// again: a training loop's next step reuses the last step's pages, already resident.
//
// The limit is NEPTUNE_CPU_CACHE_MB (default 256; 0 turns the cache off). Only memory no
// tensor uses is held; cpu_cache_clear() returns it all to the system. Huge pages
// (madvise(MADV_HUGEPAGE)) were tried and dropped: in a process that also runs other large
// PyTorch work they made the step twice as slow on the Xeon VM.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace neptune {

// at::empty(sizes, options), contiguous. On the CPU, tensors of 2 MiB or more take a cached
// mapping when one fits (at least their size, at most twice it), else a new one; every other
// tensor (and device) is at::empty's.
at::Tensor empty_cpu(at::IntArrayRef sizes, const at::TensorOptions& options);

// empty_cpu with t's sizes and options (contiguous, whatever t's strides).
inline at::Tensor empty_like_cpu(const at::Tensor& t) { return empty_cpu(t.sizes(), t.options()); }

// t.contiguous(), its copy (if any) from empty_cpu. For real tensors in a CPU kernel only:
// empty_cpu allocates without the dispatcher.
inline at::Tensor dense_cpu(const at::Tensor& t) {
  return t.is_contiguous() ? t : empty_like_cpu(t).copy_(t);
}

// [the cache's limit in bytes (0: off), the bytes it holds now (free mappings)].
std::vector<int64_t> cpu_cache_info();

// Unmaps every cached mapping; returns the bytes released.
int64_t cpu_cache_clear();

}  // namespace neptune
