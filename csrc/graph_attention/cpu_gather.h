// What the CPU graph-attention kernels (GAT and GATv2) share for their random row
// gathers: software prefetch a few edges ahead, and the parallel grain.
#pragma once

#include <algorithm>
#include <cstdint>

namespace neptune {

// Edges ahead whose rows are prefetched: the gathers are random, so the hardware
// prefetcher cannot help and each row would otherwise cost a full memory latency.
constexpr int64_t kPrefetchDistance = 6;

template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 1);
}

// Rows per parallel task: about `work` edge-features per task, to amortize scheduling.
inline int64_t grain_for(int64_t n_rows, int64_t n_edges, int64_t HC, int64_t work = 32768) {
  const int64_t work_per_row = std::max<int64_t>(1, (n_edges / std::max<int64_t>(n_rows, 1) + 1) * HC);
  return std::max<int64_t>(1, work / work_per_row);
}

}  // namespace neptune
