// What the CPU attention kernels (GAT, GATv2, graph transformer) share: the graph and
// dropout as a kernel reads them, software prefetch for the random row gathers, the split
// of rows among threads, and the forward pass itself (one online softmax per destination;
// a variant supplies only its logits and its value). Their channel math: channels_cpu.h.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "attention/common/attention.h"
#include "attention/common/attention_math.h"
#include "attention/common/channels_cpu.h"
#include "memory/cpu_alloc.h"

namespace neptune {

// Edges ahead whose rows are prefetched: the gathers are random, so the hardware
// prefetcher cannot help and each row would otherwise cost a full memory latency.
constexpr int64_t kPrefetchDistance = 6;
// The same for a logits-only pass (a few values per edge: more edges ahead).
constexpr int64_t kLogitPrefetchDistance = 16;

// One cache line prefetched into L1, by an instruction the compiler keeps. GCC (12, -O3)
// dropped the __builtin_prefetch loops of the heads-at-once forward (GATv2, the transformer,
// its edge-feature variant) altogether - the objects had no prefetch instruction there - so
// those forwards waited on every gathered row (the transformer's: 155-175 ms against 85 with
// its prefetches on the 1M-edge graph, Xeon VM, 2 threads). A volatile asm is never removed.
inline void prefetch_line(const char* p) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  asm volatile("prefetcht0 %0" : : "m"(*p));
#else
  __builtin_prefetch(p, 0, 3);
#endif
}

template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t off = 0; off < bytes; off += 64) prefetch_line(p + off);
}

// Prefetches row i (n values) of each array: a destination's rows a source pass gathers.
template <typename... T>
inline void prefetch_rows_of(int64_t i, int64_t n, const T*... arrays) {
  (prefetch_row(arrays + i * n, n), ...);
}

// The kernels' loop bodies are compiled twice: for the baseline ISA, and (GCC, x86-64) for
// AVX2 + FMA, taken when the CPU has both (once per process; NEPTUNE_CPU_ISA=base in the
// environment forces the baseline, read by cpu_avx2() on the calling thread once per loop,
// never inside a parallel region). run_rows(avx2, fn, b, e) runs a body fn(b, e)
// (a kernel's lambda over rows b..e): on AVX2 through run_avx2, which inlines the body and
// everything it calls (flatten) into one function compiled for AVX2 + FMA - the channel
// loops (`omp simd`) get 8-wide vectors and fused multiply-adds. Nothing else is compiled
// for AVX2: every out-of-line function (a helper's own copy, ATen, libm) stays baseline code,
// so no code that a CPU without AVX2 runs can contain its instructions. Results of the two
// differ in rounding (fused multiply-adds); each is deterministic.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define NEPTUNE_CPU_AVX2 1
template <typename F>
__attribute__((target("avx2,fma"), flatten)) void run_avx2(F& fn, int64_t b, int64_t e) {
  fn(b, e);
}
#endif

// Whether run_rows takes the AVX2 + FMA build of a loop body here.
inline bool cpu_avx2() {
#ifdef NEPTUNE_CPU_AVX2
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  if (!has) return false;
  const char* env = std::getenv("NEPTUNE_CPU_ISA");
  return env == nullptr || std::strcmp(env, "base") != 0;
#else
  return false;
#endif
}

template <typename F>
inline void run_rows(bool avx2, F& fn, int64_t b, int64_t e) {
#ifdef NEPTUNE_CPU_AVX2
  if (avx2) {
    run_avx2(fn, b, e);
    return;
  }
#endif
  (void)avx2;
  fn(b, e);
}

// at::parallel_for over [begin, end) with each chunk's body run by run_rows.
template <typename F>
void parallel_for_isa(int64_t begin, int64_t end, int64_t grain, F&& fn) {
  const bool avx2 = cpu_avx2();
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { run_rows(avx2, fn, b, e); });
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
  const bool avx2 = cpu_avx2();
  if (T <= 1 || total * std::max<int64_t>(HC, 1) < serial_cost) {
    if (n_rows > 0) run_rows(avx2, fn, int64_t(0), n_rows);
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
      if (bounds[c] < bounds[c + 1]) run_rows(avx2, fn, bounds[c], bounds[c + 1]);
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
  int64_t n_rows;
  CsrView(const at::Tensor& rowptr_t, const at::Tensor& col_t, const at::Tensor& eid_t)
      : rowptr(rowptr_t.data_ptr<index_t>()), col(col_t.data_ptr<index_t>()),
        eid(eid_t.data_ptr<index_t>()), E(col_t.size(0)), n_rows(rowptr_t.size(0) - 1) {}
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

// Counter-based attention dropout as a kernel applies it (attention_math.h): a
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

// What every CPU backward reads besides its variant's own inputs: dOut, the saved output
// and log-sum-exp (the struct holds them dense: the kernels index them as rows), the graph
// both ways (E: csr.E) and the dropout. The entry builds it from its arguments
// (NEPTUNE_BACKWARD_COMMON); a kernel takes it first and names its parts with
// NEPTUNE_UNPACK_BACKWARD(b).
template <typename scalar_t, typename index_t>
struct BackwardCommon {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor go_t, out_t, lse_t;  // dense (declared first: made before the pointers below)
  CsrView<index_t> csr;
  CscView<index_t> csc;
  Dropout<acc_t> drop;
  const scalar_t* go;
  const scalar_t* out;
  const acc_t* lse;
  at::TensorOptions scratch;  // of accumulation-type scratch tensors (lse's)
  BackwardCommon(const at::Tensor& grad_out, const at::Tensor& out_, const at::Tensor& lse_,
                 const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& eid,
                 const at::Tensor& colptr, const at::Tensor& csc_row, const at::Tensor& csc_perm,
                 double dropout, uint64_t seed)
      : go_t(dense_cpu(grad_out)), out_t(dense_cpu(out_)), lse_t(dense_cpu(lse_)),
        csr(rowptr, col, eid), csc(colptr, csc_row, csc_perm), drop(dropout, seed),
        go(go_t.data_ptr<scalar_t>()), out(out_t.data_ptr<scalar_t>()),
        lse(lse_t.data_ptr<acc_t>()), scratch(lse_t.options()) {}
};

// In a backward entry (NEPTUNE_ATTENTION_BACKWARD_PARAMS) inside the dtype dispatch: its
// BackwardCommon.
#define NEPTUNE_BACKWARD_COMMON                                                              \
  BackwardCommon<scalar_t, index_t>(grad_out, out, lse, rowptr, col, eid, colptr, csc_row, \
                                    csc_perm, dropout, seed_value(seed, dropout))

// The common parts of a BackwardCommon as local names (lambdas capture them by reference).
#define NEPTUNE_UNPACK_BACKWARD(b)                                                 \
  const auto* go = (b).go;                                                         \
  const auto* out = (b).out;                                                       \
  const auto* lse = (b).lse;                                                       \
  const auto& csr = (b).csr;                                                       \
  const auto& csc = (b).csc;                                                       \
  const auto& drop = (b).drop;                                                     \
  const int64_t E = (b).csr.E

// The data of an optional tensor, or nullptr.
template <typename T>
inline T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// The forward pass of every attention variant, on the CPU. Per destination i (one
// thread owns it: no races, results independent of the thread count), one pass over
// its in-edges with an online softmax per head:
//   out_i = sum_j softmax_j(logit_ij) * value_ij,   lse_i = max + log(sum)
// (a row without in-edges, or whose logits are all -inf, gets 0 and lse 0). Nothing of
// size E x H is allocated. The variant V supplies, with acc_t its accumulation type:
//   int64_t row_size()                  the size of the row's scratch (acc_t values)
//   void begin_row(acc_t* row, i)       load what the row's logits need into the scratch
//   void prefetch(j, edge)              prefetch a coming edge's rows
//   acc_t logit(const acc_t* row, j, edge, h)   edge (j, i)'s logit of head h, or
//   void logits(acc_t* row, j, edge, acc_t* x)   (instead) the edge's logits of every head
//                                       into x[0..H): the online softmax then steps every
//                                       head at once (a vector loop, online_softmax_lane)
//   void accumulate(acc_t* acc_h, rescale, w, j, edge, h)   acc_h = acc_h * rescale + w value
//   int64_t H, C                        heads and channels per head
//   int64_t edge_cost                   the split's cost of an edge, in channels (H C = 1)
// and, optionally, when its logits need no row gather:
//   kLogitsFirst                        (a member, with logits) the row's logits and their
//                                       max first, then the weighted sum without the online
//                                       rescaling
//   void prefetch_logit(j, edge)        (with it) prefetch what a coming edge's logit reads
// and, optionally, when a head accumulates more than the C values of its output:
//   int64_t acc_width()                 a head's accumulator (default C)
//   void finish(acc_t* acc_h, h, acc_t inv, scalar_t* out_h)   out_h from acc_h / sum
//                                       (acc_h is the variant's to overwrite)
// out [N_dst, H, C] (or [N_dst, H * C]) and lse [N_dst, H] are written; N_dst = out's rows.
template <typename scalar_t, typename index_t, typename V>
void attention_forward_rows(const V& var, const at::Tensor& rowptr_t, const at::Tensor& col_t,
                            const at::Tensor& eid_t, double dropout, uint64_t seed,
                            at::Tensor& out_t, at::Tensor& lse_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const CsrView<index_t> g(rowptr_t, col_t, eid_t);
  const Dropout<acc_t> drop(dropout, seed);
  const int64_t n_dst = out_t.size(0), H = var.H, C = var.C, HC = H * C;
  int64_t W = C;  // a head's accumulator
  if constexpr (requires { var.acc_width(); }) W = var.acc_width();
  scalar_t* out = out_t.data_ptr<scalar_t>();
  acc_t* lse = lse_t.data_ptr<acc_t>();
  constexpr bool kTwoPass = requires { var.kLogitsFirst; };
  constexpr bool kHeadsAtOnce = requires(acc_t* r, acc_t* x) { var.logits(r, int64_t(0), int64_t(0), x); };
  parallel_rows_by_cost(g.rowptr, n_dst, var.edge_cost * HC, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(var.row_size()), acc(H * W), m(H), s(H), logits, rs(H);
    for (int64_t i = begin; i < end; ++i) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(s.begin(), s.end(), acc_t(0));
      var.begin_row(row.data(), i);
      const int64_t e_begin = g.rowptr[i], e_end = g.rowptr[i + 1];
      if constexpr (kTwoPass) {
        // Logits that cost no row gather (GAT's: H additions): the row's logits and their
        // max first, then one exp per logit and no rescaling of the accumulators.
        if (static_cast<int64_t>(logits.size()) < (e_end - e_begin) * H)
          logits.resize((e_end - e_begin) * H);
        // (The head loops are vector loops: a row's H logits, maxima, weights and sums.)
        acc_t* lg = logits.data();
        acc_t* mx = m.data();
        acc_t* sum = s.data();
        for (int64_t e = e_begin; e < e_end; ++e) {
          if (e + kLogitPrefetchDistance < g.E)
            var.prefetch_logit(g.col[e + kLogitPrefetchDistance], g.eid[e + kLogitPrefetchDistance]);
          acc_t* x = lg + (e - e_begin) * H;
          var.logits(row.data(), g.col[e], g.eid[e], x);
#pragma omp simd
          for (int64_t h = 0; h < H; ++h) {
            const acc_t a = x[h], b = mx[h];
            mx[h] = a > b ? a : b;  // (a NaN logit is skipped here, and propagates below)
          }
        }
        // only masked logits (-inf): weights exp(-inf - 0) = 0, no mass; a +inf one: NaN
        for (int64_t h = 0; h < H; ++h)
          if (m[h] == -std::numeric_limits<acc_t>::infinity()) m[h] = acc_t(0);
        for (int64_t e = e_begin; e < e_end; ++e) {
          if (e + kPrefetchDistance < g.E)
            var.prefetch(g.col[e + kPrefetchDistance], g.eid[e + kPrefetchDistance]);
          const int64_t j = g.col[e], edge = g.eid[e];
          acc_t* w = lg + (e - e_begin) * H;
#pragma omp simd
          for (int64_t h = 0; h < H; ++h) {
            const acc_t wh = exp_acc(w[h] - mx[h]);
            w[h] = wh;
            sum[h] += wh;
          }
          for (int64_t h = 0; h < H; ++h)
            var.accumulate(acc.data() + h * W, acc_t(1), drop.apply(w[h], edge, h), j, edge, h);
        }
      } else if constexpr (kHeadsAtOnce) {
        logits.resize(H);
        acc_t* x = logits.data();
        acc_t* mx = m.data();
        acc_t* sum = s.data();
        acc_t* rescale = rs.data();
        for (int64_t e = e_begin; e < e_end; ++e) {
          if (e + kPrefetchDistance < g.E)
            var.prefetch(g.col[e + kPrefetchDistance], g.eid[e + kPrefetchDistance]);
          const int64_t j = g.col[e], edge = g.eid[e];
          var.logits(row.data(), j, edge, x);
#pragma omp simd
          for (int64_t h = 0; h < H; ++h) online_softmax_lane(x[h], mx[h], sum[h], rescale[h], x[h]);
          for (int64_t h = 0; h < H; ++h)
            var.accumulate(acc.data() + h * W, rescale[h], drop.apply(x[h], edge, h), j, edge, h);
        }
      } else {
        for (int64_t e = e_begin; e < e_end; ++e) {
          if (e + kPrefetchDistance < g.E)
            var.prefetch(g.col[e + kPrefetchDistance], g.eid[e + kPrefetchDistance]);
          const int64_t j = g.col[e], edge = g.eid[e];
          for (int64_t h = 0; h < H; ++h) {
            const acc_t x = var.logit(row.data(), j, edge, h);
            acc_t rescale, w;
            online_softmax_step(x, m[h], s[h], rescale, w);
            var.accumulate(acc.data() + h * W, rescale, drop.apply(w, edge, h), j, edge, h);
          }
        }
      }
      for (int64_t h = 0; h < H; ++h) {
        const bool any = softmax_has_mass(s[h]);
        const acc_t inv = any ? acc_t(1) / s[h] : acc_t(0);
        lse[i * H + h] = any ? m[h] + std::log(s[h]) : acc_t(0);
        scalar_t* o = out + i * HC + h * C;
        acc_t* a = acc.data() + h * W;
        if constexpr (requires { var.finish(a, h, inv, o); }) {
          var.finish(a, h, inv, o);
        } else {
          for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(a[c] * inv);
        }
      }
    }
  });
}

// A CPU forward entry after its variant's checks: out (out_sizes, in `like`'s dtype) and
// lse [out rows, H] allocated, and, inside the dtype x index dispatch,
// make(static_cast<scalar_t*>(nullptr)) builds the variant that attention_forward_rows runs.
template <typename MakeVariant>
std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& like, at::IntArrayRef out_sizes, int64_t H, const at::Tensor& rowptr,
    const at::Tensor& col, const at::Tensor& eid, double dropout,
    const std::optional<at::Tensor>& seed, MakeVariant make) {
  at::Tensor out = empty_cpu(out_sizes, like.options());
  at::Tensor lse = at::empty({out_sizes[0], H}, like.options().dtype(acc_dtype(like.scalar_type())));
  NEPTUNE_DISPATCH_FLOAT_AND_INDEX(like.scalar_type(), col.scalar_type(), "attention_forward_cpu", [&] {
    const auto var = make(static_cast<scalar_t*>(nullptr));
    attention_forward_rows<scalar_t, index_t>(var, rowptr, col, eid, dropout,
                                              seed_value(seed, dropout), out, lse);
  });
  return {out, lse};
}


}  // namespace neptune
