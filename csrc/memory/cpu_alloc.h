// Large CPU buffers on transparent huge pages (host code).
//
// A kernel's large output or scratch buffer is touched once, in full, right after it is
// allocated. From the C library it is a fresh anonymous mapping every call (glibc maps
// blocks this large on their own and unmaps them on free), so every 4 KiB page costs a
// page fault on first touch: on the 2-core VMs this is about a quarter of a sampled
// mini-batch step. empty_cpu maps such buffers itself, 2 MiB-aligned, with
// madvise(MADV_HUGEPAGE): one fault per 2 MiB. The memory is ordinary tensor storage
// (resizable, freed with the tensor); only where it comes from differs.
#pragma once

#include <ATen/core/Tensor.h>

namespace neptune {

// at::empty(sizes, options), contiguous. On Linux CPUs, tensors of at least 2 MiB come from
// huge-page mappings unless NEPTUNE_CPU_HUGEPAGES=0 or the kernel's THP mode is "never";
// everything else (and every other device) is at::empty's.
at::Tensor empty_cpu(at::IntArrayRef sizes, const at::TensorOptions& options);

// empty_cpu with t's sizes and options (contiguous, whatever t's strides).
inline at::Tensor empty_like_cpu(const at::Tensor& t) { return empty_cpu(t.sizes(), t.options()); }

// Whether empty_cpu maps large tensors itself in this process (read once).
bool cpu_hugepages_enabled();

}  // namespace neptune
