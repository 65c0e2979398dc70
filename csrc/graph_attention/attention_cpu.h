// What the CPU attention kernels (GAT, GATv2, graph transformer) share: the graph and
// dropout as a kernel reads them, software prefetch for the random row gathers, the
// split of rows among threads, the channel loops, and the forward pass itself (one
// online softmax per destination; a variant supplies only its logit and its value).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "graph_attention_math.h"

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


// The graph as a kernel reads it: the CSR of in-edges per destination (rowptr, col =
// source, eid = the caller's edge id) and, for the backward's source passes, the CSC
// (colptr, row = destination, perm = the edge's CSR position).
template <typename index_t>
struct CsrView {
  const index_t* rowptr;
  const index_t* col;
  const index_t* eid;
  int64_t E;
  CsrView(const at::Tensor& rowptr_t, const at::Tensor& col_t, const at::Tensor& eid_t)
      : rowptr(rowptr_t.data_ptr<index_t>()), col(col_t.data_ptr<index_t>()),
        eid(eid_t.data_ptr<index_t>()), E(col_t.size(0)) {}
};

template <typename index_t>
struct CscView {
  const index_t* colptr;
  const index_t* row;
  const index_t* perm;
  CscView(const at::Tensor& colptr_t, const at::Tensor& row_t, const at::Tensor& perm_t)
      : colptr(colptr_t.data_ptr<index_t>()), row(row_t.data_ptr<index_t>()),
        perm(perm_t.data_ptr<index_t>()) {}
};

// Counter-based attention dropout as a kernel applies it (graph_attention_math.h): a
// weight w of (edge, head) becomes w / (1 - p) or 0.
template <typename acc_t>
struct Dropout {
  bool on;
  float p;
  acc_t keep_scale;
  uint64_t seed;
  Dropout(double p_d, uint64_t seed_)
      : on(p_d > 0.0), p(static_cast<float>(p_d)), keep_scale(dropout_keep_scale<acc_t>(p_d)),
        seed(seed_) {}
  acc_t apply(acc_t w, int64_t edge, int64_t head) const {
    if (!on) return w;
    return dropout_keep(seed, edge, head, p) ? w * keep_scale : acc_t(0);
  }
};

// The data of an optional tensor, or nullptr.
template <typename T>
inline T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// <a, b> over C channels in the accumulation type.
template <typename acc_t, typename A, typename B>
inline acc_t dot_channels(const A* a, const B* b, int64_t C) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < C; ++c) s += static_cast<acc_t>(a[c]) * static_cast<acc_t>(b[c]);
  return s;
}

// acc = acc * rescale + w * (v (+ e)) over C channels (e: an optional second addend).
template <typename scalar_t, typename acc_t>
inline void axpy_rescaled(acc_t* acc, acc_t rescale, acc_t w, const scalar_t* v, const scalar_t* e,
                          int64_t C) {
  if (e) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c)
      acc[c] = acc[c] * rescale + w * (static_cast<acc_t>(v[c]) + static_cast<acc_t>(e[c]));
  } else if (rescale != acc_t(1)) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) acc[c] = acc[c] * rescale + w * static_cast<acc_t>(v[c]);
  } else {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) acc[c] += w * static_cast<acc_t>(v[c]);
  }
}

// dst[c] = src[c] * scale over n values, into the accumulation type.
template <typename scalar_t, typename acc_t>
inline void load_scaled(acc_t* dst, const scalar_t* src, acc_t scale, int64_t n) {
  for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<acc_t>(src[c]) * scale;
}

// D_i = <dOut_i, out_i> per head: the softmax backward's row term (H values).
template <typename scalar_t, typename acc_t>
inline void row_dots(const scalar_t* go, const scalar_t* out, int64_t H, int64_t C, acc_t* D) {
  for (int64_t h = 0; h < H; ++h) D[h] = dot_channels<acc_t>(go + h * C, out + h * C, C);
}

// The forward pass of every attention variant, on the CPU. Per destination i (one
// thread owns it: no races, results independent of the thread count), one pass over
// its in-edges with an online softmax per head:
//   out_i = sum_j softmax_j(logit_ij) * value_ij,   lse_i = max + log(sum)
// (a row without in-edges, or whose logits are all -inf, gets 0 and lse 0). Nothing of
// size E x H is allocated. The variant V supplies, with acc_t its accumulation type:
//   typename V::Row                     per-thread scratch, V::Row(const V&)
//   void begin_row(Row&, i)             load what the row's logits need
//   void prefetch(j, edge)              prefetch a coming edge's rows
//   acc_t logit(const Row&, j, edge, h)
//   void accumulate(acc_t* acc_h, rescale, w, j, edge, h)   acc_h = acc_h * rescale + w value
//   int64_t edge_cost                   the split's cost of an edge, in channels (H C = 1)
template <typename scalar_t, typename acc_t, typename index_t, typename V>
void attention_forward_rows(const V& var, const CsrView<index_t>& g, int64_t n_dst, int64_t H,
                            int64_t C, const Dropout<acc_t>& drop, scalar_t* out, acc_t* lse) {
  const int64_t HC = H * C;
  parallel_rows_by_cost(g.rowptr, n_dst, var.edge_cost * HC, [&](int64_t begin, int64_t end) {
    typename V::Row row(var);
    std::vector<acc_t> acc(HC), m(H), s(H);
    for (int64_t i = begin; i < end; ++i) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(s.begin(), s.end(), acc_t(0));
      var.begin_row(row, i);
      const int64_t e_end = g.rowptr[i + 1];
      for (int64_t e = g.rowptr[i]; e < e_end; ++e) {
        if (e + kPrefetchDistance < g.E)
          var.prefetch(g.col[e + kPrefetchDistance], g.eid[e + kPrefetchDistance]);
        const int64_t j = g.col[e], edge = g.eid[e];
        for (int64_t h = 0; h < H; ++h) {
          const acc_t x = var.logit(row, j, edge, h);
          acc_t rescale, w;
          online_softmax_step(x, m[h], s[h], rescale, w);
          var.accumulate(acc.data() + h * C, rescale, drop.apply(w, edge, h), j, edge, h);
        }
      }
      for (int64_t h = 0; h < H; ++h) {
        const bool any = softmax_has_mass(s[h]);
        const acc_t inv = any ? acc_t(1) / s[h] : acc_t(0);
        lse[i * H + h] = any ? m[h] + std::log(s[h]) : acc_t(0);
        scalar_t* o = out + i * HC + h * C;
        const acc_t* a = acc.data() + h * C;
        for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(a[c] * inv);
      }
    }
  });
}

}  // namespace neptune
