// What the CPU graph-attention kernels (GAT and GATv2) share for their random row
// gathers: software prefetch a few edges ahead, and the parallel grain.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

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

// Runs fn(row_begin, row_end) over rows [0, n_rows) of a CSR (or CSC) pointer array in
// one contiguous chunk per thread, the chunks cut at equal cost (edges + rows) rather
// than at equal row counts: on a power-law graph the half of the rows holding a hub
// carries most of the edges, and an equal-rows split leaves one thread idle. Graphs
// below `serial_cost` (edge-features) run on the calling thread. Each row belongs to
// exactly one chunk, so results do not depend on the split.
template <typename index_t, typename F>
void parallel_rows_by_cost(const index_t* ptr, int64_t n_rows, int64_t HC, F&& fn,
                           int64_t serial_cost = 32768) {
  const int64_t total = static_cast<int64_t>(ptr[n_rows]) + n_rows;
  const int64_t T = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(n_rows, 1));
  if (T <= 1 || total * std::max<int64_t>(HC, 1) < serial_cost) {
    if (n_rows > 0) fn(int64_t(0), n_rows);
    return;
  }
  std::vector<int64_t> bounds(T + 1, n_rows);
  bounds[0] = 0;
  for (int64_t t = 1; t < T; ++t) {
    const int64_t target = total * t / T;
    int64_t lo = bounds[t - 1], hi = n_rows;  // the first row r with ptr[r] + r >= target
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (static_cast<int64_t>(ptr[mid]) + mid < target) lo = mid + 1; else hi = mid;
    }
    bounds[t] = lo;
  }
  at::parallel_for(0, T, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c)
      if (bounds[c] < bounds[c + 1]) fn(bounds[c], bounds[c + 1]);
  });
}

}  // namespace neptune
