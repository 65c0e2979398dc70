// Fused sparse graph attention on CUDA: forward and a deterministic backward.
//
// Semantics: exactly those of graph_attention_cpu.cpp (see the comment there);
// the per-element math (LeakyReLU, online softmax step and merge, dropout RNG)
// comes from graph_attention_math.h, so both back ends compute the same thing.
//
// Three reductions over a CSR-like structure (ptr [n + 1], E entries) do all
// the work:
//   Forward  rows = destinations (rowptr/col/eid): online softmax of the
//            logits, sum of weighted h[j]   -> out [N_dst, H, C], lse [N_dst, H]
//   Pass 1   rows = destinations: per edge dS and a' (stored, [E, H, 2]),
//            sum of dS                      -> grad score_dst, grad edge_logits
//   Pass 2   rows = sources (colptr/csc_row/csc_perm): sums of dS and of
//            a' * dOut[i]                   -> grad score_src, grad h
//
// Work decomposition, identical for the three:
//  * A *group* of G lanes (a power of two <= 32, inside one warp) owns one row
//    (or one "tile" of its heads x channel vectors when H*C is wide). Lanes are
//    laid out head-major: LPH lanes per head (a power of two), each lane holding
//    16-byte vectors along C (8 x fp16/bf16, 4 x fp32; scalars when C or the
//    alignment does not allow vectors, and for fp64). A group reads a chunk of G
//    edge indices, one per lane, and shares them by shuffles; then the rows of U
//    edges are loaded before any is used, so several 16-byte gathers per lane
//    are in flight. fp32 accumulation (fp64 for fp64).
//  * Rows of high degree are split without any host synchronization: the edge
//    array is cut into fixed segments of L edges (L from E and the record size,
//    both known on the host).
//    A segment intersects at most two rows longer than L (the one holding its
//    first edge and the one holding its last), so a "leaf" kernel writes, per
//    segment, at most two partial records (forward: max, sum and accumulator;
//    backward: sums) for the long rows it meets. Further levels merge 32
//    consecutive records per record (segments of 32 L, 1024 L, ... edges) until
//    the top level has at most 32 segments per row, and the row kernel merges at
//    most 34 records of the right level for each long row, and finishes short
//    rows (degree <= L) by itself. Every merge runs in a fixed order, so results
//    are bitwise reproducible; nothing uses floating-point atomics. A hub with
//    millions of in-edges is spread over thousands of groups instead of one.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#ifdef NEPTUNE_CUDA_EMULATION
// tests/cuda_emulation: the same kernels run on the CPU, lanes as fibers (a test
// harness for machines without a GPU; never part of the package build).
#include "cuda_emulation.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define NEPTUNE_LAUNCH(kernel, grid, stream, ...)                 \
  do {                                                            \
    kernel<<<(grid), kBlock, 0, (stream)>>>(__VA_ARGS__);         \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                               \
  } while (0)
#define NEPTUNE_CHECK_ALIGNED(ptr, bytes) ((void)0)
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "graph_attention.h"
#include "graph_attention_math.h"

namespace neptune {
namespace {

constexpr int kBlock = 256;             // threads per block (a multiple of 32)
#ifndef NEPTUNE_GAT_FAN_IN  // (the CPU emulation tests shrink these to get deep trees)
#define NEPTUNE_GAT_FAN_IN 32
#define NEPTUNE_GAT_MIN_LEAF 256
#endif
constexpr int64_t kFanIn = NEPTUNE_GAT_FAN_IN;  // records merged into one, per tree level
constexpr int kMaxLevels = 16;          // 256 * 32^15 edges: never reached
constexpr int64_t kMinLeaf = NEPTUNE_GAT_MIN_LEAF;  // shortest leaf segment, in edges
constexpr int64_t kMaxLeaves = 65536;   // at most this many leaf segments ...
constexpr int64_t kLeafBudget = int64_t(1) << 24;  // ... and leaves x record <= this

// ----------------------------------------------------------------------------
// Host-computed shapes.

// How a group's lanes cover one row's H x C features.
struct Layout {
  int64_t H, C, HC;
  int64_t VPH;   // vectors per head: C / vector width
  int LPH;       // lanes per head (power of two)
  int HPG;       // heads side by side in a group
  int G;         // lanes per group = LPH * HPG (power of two, <= 32)
  int vi;        // vector iterations per head: ceil(max(VPH, 1) / LPH)
  int units;     // per-row work units: head iterations (x vi unless heads_only)
  int tiles;     // groups per row: ceil(units / slots per thread)
};

int pow2ceil(int64_t x) {
  int p = 1;
  while (p < x && p < 32) p <<= 1;
  return p;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// heads_only: a thread owns whole heads and walks their vectors in a loop
// (pass 1, which needs complete per-head dot products); otherwise a thread owns
// `nslot` (head, vector) units held in registers.
Layout make_layout(int64_t H, int64_t C, int vec, int nslot, bool heads_only) {
  Layout l;
  l.H = H;
  l.C = C;
  l.HC = H * C;
  l.VPH = C / vec;
  const int64_t vph = std::max<int64_t>(l.VPH, 1);  // C = 0 still has logits
  l.LPH = pow2ceil(vph);
  l.vi = static_cast<int>(ceil_div(vph, l.LPH));
  l.HPG = std::min(32 / l.LPH, pow2ceil(H));
  l.G = l.LPH * l.HPG;
  const int64_t head_iters = ceil_div(H, l.HPG);
  const int64_t units = heads_only ? head_iters : head_iters * l.vi;
  TORCH_CHECK(units <= std::numeric_limits<int>::max() / 4,
              "neptune::gat (CUDA): H * C too large");
  l.units = static_cast<int>(units);
  l.tiles = static_cast<int>(ceil_div(units, nslot));
  return l;
}

// The record tree for the rows longer than one leaf segment.
struct Tree {
  int64_t n;                // rows
  int64_t E;                // entries
  int K;                    // levels (0: no row is longer than L[0])
  int64_t rec;              // record size (elements of the accumulation type)
  int64_t L[kMaxLevels];    // segment length, per level
  int64_t S[kMaxLevels];    // segment count, per level
  int64_t off[kMaxLevels];  // first record of the level, in elements
  int64_t total;            // elements of all records
  void* records;
};

Tree make_tree(int64_t n, int64_t E, int64_t rec) {
  Tree t{};
  t.n = n;
  t.E = E;
  t.rec = rec;
  const int64_t leaves = std::max<int64_t>(
      1, std::min<int64_t>(kMaxLeaves, kLeafBudget / std::max<int64_t>(2 * rec, 1)));
  int64_t L = kMinLeaf;
  while (ceil_div(E, L) > leaves) L *= 2;
  t.L[0] = L;
  t.K = 0;
  if (E > L) {
    t.K = 1;
    while (kFanIn * t.L[t.K - 1] < E) {
      TORCH_CHECK(t.K < kMaxLevels, "neptune::gat (CUDA): graph too large");
      t.L[t.K] = t.L[t.K - 1] * kFanIn;
      ++t.K;
    }
  }
  int64_t off = 0;
  for (int k = 0; k < t.K; ++k) {
    t.S[k] = ceil_div(E, t.L[k]);
    t.off[k] = off;
    off += t.S[k] * 2 * rec;
  }
  t.total = off;
  t.records = nullptr;
  return t;
}

// Outputs and scratch. The CPU emulation fills them with NaN, so an element that
// no thread writes, or a record read before it is written, shows in the results.
at::Tensor new_tensor(at::IntArrayRef size, const at::TensorOptions& opts) {
#ifdef NEPTUNE_CUDA_EMULATION
  return at::full(size, std::numeric_limits<double>::quiet_NaN(), opts);
#else
  return at::empty(size, opts);
#endif
}

// ----------------------------------------------------------------------------
// Device helpers.

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
__device__ __forceinline__ float acc_exp(float x) { return ::expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return ::exp(x); }
__device__ __forceinline__ float acc_log(float x) { return ::logf(x); }
__device__ __forceinline__ double acc_log(double x) { return ::log(x); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// N consecutive elements: one 16-byte access when N * sizeof(T) == 16. Kept in
// the input type until used (half the registers for fp16/bf16).
template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  NEPTUNE_CHECK_ALIGNED(p, sizeof(Vec<T, N>));
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> zero_vec() {
  Vec<T, N> r;
#pragma unroll
  for (int v = 0; v < N; ++v) r.v[v] = T(0);
  return r;
}

template <typename T, int N, typename A>
__device__ __forceinline__ void store_vec(T* p, const A (&x)[N], A scale) {
  NEPTUNE_CHECK_ALIGNED(p, sizeof(Vec<T, N>));
  Vec<T, N> r;
#pragma unroll
  for (int v = 0; v < N; ++v) r.v[v] = static_cast<T>(x[v] * scale);
  if constexpr (sizeof(r) == 16) {
    // Spelled out: nvcc turned the struct store into four 4-byte stores here.
    uint32_t w[4];
    memcpy(w, &r, sizeof(w));
#ifdef NEPTUNE_CUDA_EMULATION
    memcpy(p, w, sizeof(w));
#else
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w[0]), "r"(w[1]),
                 "r"(w[2]), "r"(w[3])
                 : "memory");
#endif
  } else {
    *reinterpret_cast<Vec<T, N>*>(p) = r;
  }
}

// (dS, a') of one (edge, head), stored together so pass 2 reads them in one access.
template <typename A>
struct alignas(2 * sizeof(A)) DsAp {
  A ds, ap;
};

// Sum over the LPH lanes of one head (an aligned power-of-two lane range). The
// butterfly gives every lane the bitwise same value (a + b == b + a).
template <typename A>
__device__ __forceinline__ A head_sum(A v, unsigned mask, int lph) {
  for (int o = lph >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(mask, v, o);
  return v;
}

// Largest r in [lo, hi) with ptr[r] <= pos, given ptr[lo] <= pos < ptr[hi].
template <typename index_t>
__device__ __forceinline__ int64_t find_row(const index_t* ptr, int64_t lo, int64_t hi,
                                            int64_t pos) {
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (static_cast<int64_t>(ptr[mid]) <= pos)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

// What one thread owns: NSLOT (head, vector) units of its group's row.
template <int NSLOT>
struct Lanes {
  int lane_g;          // lane within the group
  int gbase;           // first lane of the group within the warp
  int lih;             // lane within the head
  unsigned mask;       // the group's lanes
  int64_t head[NSLOT];
  int64_t c[NSLOT];    // offset of the unit's vector within a row of H * C
  bool head_ok[NSLOT]; // the unit maps to a head < H
  bool vec_ok[NSLOT];  // ... and to a vector < C / VEC
  bool leader[NSLOT];  // writes the per-head scalars of that head
};

template <int NSLOT, bool HEADS_ONLY>
__device__ __forceinline__ Lanes<NSLOT> make_lanes(const Layout& l, int tile, int vec) {
  Lanes<NSLOT> ln;
  const int lane = static_cast<int>(threadIdx.x & 31);
  ln.lane_g = lane & (l.G - 1);
  ln.gbase = lane - ln.lane_g;
  ln.mask = l.G == 32 ? 0xffffffffu : (((1u << l.G) - 1u) << ln.gbase);
  const int hig = ln.lane_g / l.LPH;
  ln.lih = ln.lane_g - hig * l.LPH;
#pragma unroll
  for (int s = 0; s < NSLOT; ++s) {
    const int u = tile * NSLOT + s;
    const int hit = HEADS_ONLY ? u : u / l.vi;
    const int vit = HEADS_ONLY ? 0 : u - hit * l.vi;
    const int64_t head = int64_t(hit) * l.HPG + hig;
    const int64_t v = int64_t(vit) * l.LPH + ln.lih;
    ln.head[s] = head;
    ln.head_ok[s] = u < l.units && head < l.H;
    ln.vec_ok[s] = ln.head_ok[s] && v < l.VPH;
    ln.c[s] = head * l.C + v * vec;
    ln.leader[s] = ln.head_ok[s] && vit == 0 && ln.lih == 0;
  }
  return ln;
}

// ----------------------------------------------------------------------------
// Forward: online softmax over the in-edges of a destination.

template <typename scalar_t, typename index_t>
struct FwdParams {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* h;
  const scalar_t* ss;
  const scalar_t* sd;
  const scalar_t* el;  // nullable
  const index_t* ptr;  // rowptr
  const index_t* col;
  const index_t* eid;
  scalar_t* out;
  acc_t* lse;
  acc_t slope, keep_scale;
  float p;
  uint64_t seed;
  bool dropout;
};

template <typename scalar_t, typename index_t, int VEC, int NSLOT>
struct Forward {
  using acc_t = at::opmath_type<scalar_t>;
  using Params = FwdParams<scalar_t, index_t>;
  using Ln = Lanes<NSLOT>;
  static constexpr int kU = NSLOT == 1 ? 4 : 2;  // edges whose rows are loaded together
  struct State {
    acc_t m[NSLOT], s[NSLOT], acc[NSLOT][VEC];
  };

  // Record: m [H], s [H], acc [H * C].
  static int64_t rec_size(const Layout& l) { return 2 * l.H + l.HC; }

  __device__ static Ln lanes(const Layout& l, int tile) {
    return make_lanes<NSLOT, false>(l, tile, VEC);
  }

  __device__ static void init(State& st) {
#pragma unroll
    for (int s = 0; s < NSLOT; ++s) {
      st.m[s] = -std::numeric_limits<acc_t>::infinity();
      st.s[s] = acc_t(0);
#pragma unroll
      for (int v = 0; v < VEC; ++v) st.acc[s][v] = acc_t(0);
    }
  }

  __device__ static void process(const Params& p, const Layout& l, const Ln& ln, int64_t row,
                                 int64_t lo, int64_t hi, State& st) {
    acc_t base[NSLOT];
#pragma unroll
    for (int s = 0; s < NSLOT; ++s)
      base[s] = ln.head_ok[s] ? static_cast<acc_t>(p.sd[row * l.H + ln.head[s]]) : acc_t(0);
    const bool need_eid = p.el != nullptr || p.dropout;
    for (int64_t chunk = lo; chunk < hi; chunk += l.G) {
      const int n = static_cast<int>(imin(l.G, hi - chunk));
      long long my_j = 0, my_e = 0;
      if (ln.lane_g < n) {
        my_j = static_cast<long long>(p.col[chunk + ln.lane_g]);
        if (need_eid) my_e = static_cast<long long>(p.eid[chunk + ln.lane_g]);
      }
      for (int t = 0; t < n; t += kU) {
        int64_t j[kU], e[kU];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          const int src = ln.gbase + (t + u < n ? t + u : n - 1);
          j[u] = __shfl_sync(ln.mask, my_j, src);
          e[u] = need_eid ? __shfl_sync(ln.mask, my_e, src) : 0;
        }
        // Issue every load of the kU edges before the first use.
        acc_t sv[kU][NSLOT], ev[kU][NSLOT];
        Vec<scalar_t, VEC> hv[kU][NSLOT];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
#pragma unroll
          for (int s = 0; s < NSLOT; ++s) {
            const bool ok = t + u < n && ln.head_ok[s];
            sv[u][s] = ok ? static_cast<acc_t>(p.ss[j[u] * l.H + ln.head[s]]) : acc_t(0);
            ev[u][s] = ok && p.el ? static_cast<acc_t>(p.el[e[u] * l.H + ln.head[s]]) : acc_t(0);
            hv[u][s] = ok && ln.vec_ok[s] ? load_vec<scalar_t, VEC>(p.h + j[u] * l.HC + ln.c[s])
                                          : zero_vec<scalar_t, VEC>();
          }
        }
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          if (t + u >= n) break;
#pragma unroll
          for (int s = 0; s < NSLOT; ++s) {
            if (!ln.head_ok[s]) continue;
            acc_t raw = base[s] + sv[u][s];
            if (p.el) raw += ev[u][s];
            const acc_t x = leaky_relu(raw, p.slope);
            acc_t rescale, w;
            online_softmax_step(x, st.m[s], st.s[s], rescale, w);
            if (p.dropout)
              w = dropout_keep(p.seed, e[u], ln.head[s], p.p) ? w * p.keep_scale : acc_t(0);
            if (rescale != acc_t(1)) {
#pragma unroll
              for (int v = 0; v < VEC; ++v)
                st.acc[s][v] = st.acc[s][v] * rescale + w * static_cast<acc_t>(hv[u][s].v[v]);
            } else {
#pragma unroll
              for (int v = 0; v < VEC; ++v) st.acc[s][v] += w * static_cast<acc_t>(hv[u][s].v[v]);
            }
          }
        }
      }
    }
  }

  __device__ static void store(const Layout& l, const Ln& ln, const State& st, acc_t* rec) {
#pragma unroll
    for (int s = 0; s < NSLOT; ++s) {
      if (ln.leader[s]) {
        rec[ln.head[s]] = st.m[s];
        rec[l.H + ln.head[s]] = st.s[s];
      }
      if (ln.vec_ok[s]) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) rec[2 * l.H + ln.c[s] + v] = st.acc[s][v];
      }
    }
  }

  __device__ static void combine(const Layout& l, const Ln& ln, const acc_t* rec, State& st) {
#pragma unroll
    for (int s = 0; s < NSLOT; ++s) {
      if (!ln.head_ok[s]) continue;
      acc_t m, sum, f1, f2;
      online_softmax_merge(st.m[s], st.s[s], rec[ln.head[s]], rec[l.H + ln.head[s]], m, sum, f1,
                           f2);
      if (ln.vec_ok[s]) {
#pragma unroll
        for (int v = 0; v < VEC; ++v)
          st.acc[s][v] = st.acc[s][v] * f1 + rec[2 * l.H + ln.c[s] + v] * f2;
      }
      st.m[s] = m;
      st.s[s] = sum;
    }
  }

  __device__ static void finalize(const Params& p, const Layout& l, const Ln& ln, int64_t row,
                                  const State& st) {
#pragma unroll
    for (int s = 0; s < NSLOT; ++s) {
      const bool any = softmax_has_mass(st.s[s]);
      if (ln.vec_ok[s])
        store_vec<scalar_t, VEC>(p.out + row * l.HC + ln.c[s], st.acc[s],
                                 any ? acc_t(1) / st.s[s] : acc_t(0));
      if (ln.leader[s])
        p.lse[row * l.H + ln.head[s]] = any ? st.m[s] + acc_log(st.s[s]) : acc_t(0);
    }
  }
};

// ----------------------------------------------------------------------------
// Backward pass 1: destinations. dS_ij = (a'_ij <dOut_i, h_j> - a_ij D_i) * LeakyReLU'.

template <typename scalar_t, typename index_t>
struct Bwd1Params {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* go;
  const scalar_t* h;
  const scalar_t* ss;
  const scalar_t* sd;
  const scalar_t* el;  // nullable
  const scalar_t* out;
  const acc_t* lse;
  const index_t* ptr;  // rowptr
  const index_t* col;
  const index_t* eid;
  DsAp<acc_t>* dsap;   // [E, H], CSR order
  scalar_t* gel;       // nullable, caller order
  scalar_t* gsd;
  acc_t slope, keep_scale;
  float p;
  uint64_t seed;
  bool dropout;
};

template <typename scalar_t, typename index_t, int VEC>
struct Backward1 {
  using acc_t = at::opmath_type<scalar_t>;
  using Params = Bwd1Params<scalar_t, index_t>;
  using Ln = Lanes<1>;
  static constexpr int kU = 4;
  struct State {
    acc_t g;  // sum of dS over the edges seen, for this thread's head
  };

  static int64_t rec_size(const Layout& l) { return l.H; }

  __device__ static Ln lanes(const Layout& l, int tile) {
    return make_lanes<1, true>(l, tile, VEC);
  }

  __device__ static void init(State& st) { st.g = acc_t(0); }

  __device__ static void process(const Params& p, const Layout& l, const Ln& ln, int64_t row,
                                 int64_t lo, int64_t hi, State& st) {
    const bool hok = ln.head_ok[0];
    const int64_t head = ln.head[0];
    const int64_t hoff = head * l.C;
    const scalar_t* go_row = p.go + row * l.HC;
    // D = <dOut_i, out_i> for this head.
    acc_t d = acc_t(0);
    if (hok) {
      for (int64_t v = ln.lih; v < l.VPH; v += l.LPH) {
        const auto a = load_vec<scalar_t, VEC>(go_row + hoff + v * VEC);
        const auto b = load_vec<scalar_t, VEC>(p.out + row * l.HC + hoff + v * VEC);
#pragma unroll
        for (int x = 0; x < VEC; ++x) d += static_cast<acc_t>(a.v[x]) * static_cast<acc_t>(b.v[x]);
      }
    }
    const acc_t D = head_sum(d, ln.mask, l.LPH);
    const acc_t lse = hok ? p.lse[row * l.H + head] : acc_t(0);
    const acc_t base = hok ? static_cast<acc_t>(p.sd[row * l.H + head]) : acc_t(0);
    const bool need_eid = p.el != nullptr || p.dropout;
    for (int64_t chunk = lo; chunk < hi; chunk += l.G) {
      const int n = static_cast<int>(imin(l.G, hi - chunk));
      long long my_j = 0, my_e = 0;
      if (ln.lane_g < n) {
        my_j = static_cast<long long>(p.col[chunk + ln.lane_g]);
        if (need_eid) my_e = static_cast<long long>(p.eid[chunk + ln.lane_g]);
      }
      for (int t = 0; t < n; t += kU) {
        int64_t j[kU], e[kU];
        acc_t sv[kU], ev[kU], dot[kU];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          const int src = ln.gbase + (t + u < n ? t + u : n - 1);
          j[u] = __shfl_sync(ln.mask, my_j, src);
          e[u] = need_eid ? __shfl_sync(ln.mask, my_e, src) : 0;
          const bool ok = t + u < n && hok;
          sv[u] = ok ? static_cast<acc_t>(p.ss[j[u] * l.H + head]) : acc_t(0);
          ev[u] = ok && p.el ? static_cast<acc_t>(p.el[e[u] * l.H + head]) : acc_t(0);
          dot[u] = acc_t(0);
        }
        if (hok) {
          for (int64_t v = ln.lih; v < l.VPH; v += l.LPH) {
            const auto gv = load_vec<scalar_t, VEC>(go_row + hoff + v * VEC);
            Vec<scalar_t, VEC> hv[kU];
#pragma unroll
            for (int u = 0; u < kU; ++u)
              hv[u] = t + u < n ? load_vec<scalar_t, VEC>(p.h + j[u] * l.HC + hoff + v * VEC)
                                : zero_vec<scalar_t, VEC>();
#pragma unroll
            for (int u = 0; u < kU; ++u) {
#pragma unroll
              for (int x = 0; x < VEC; ++x)
                dot[u] += static_cast<acc_t>(gv.v[x]) * static_cast<acc_t>(hv[u].v[x]);
            }
          }
        }
#pragma unroll
        for (int u = 0; u < kU; ++u) dot[u] = head_sum(dot[u], ln.mask, l.LPH);
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          if (t + u >= n || !hok) continue;
          acc_t raw = base + sv[u];
          if (p.el) raw += ev[u];
          const acc_t a = acc_exp(leaky_relu(raw, p.slope) - lse);
          acc_t a_kept = a;
          if (p.dropout)
            a_kept = dropout_keep(p.seed, e[u], head, p.p) ? a * p.keep_scale : acc_t(0);
          const acc_t g = a_kept != acc_t(0) ? dot[u] : acc_t(0);
          const acc_t dS = logit_grad(a_kept, g, a, D, raw, p.slope);
          st.g += dS;
          if (ln.leader[0]) {
            const int64_t pos = chunk + t + u;
            DsAp<acc_t> r;
            r.ds = dS;
            r.ap = a_kept;
            p.dsap[pos * l.H + head] = r;
            if (p.gel) p.gel[e[u] * l.H + head] = static_cast<scalar_t>(dS);
          }
        }
      }
    }
  }

  __device__ static void store(const Layout& l, const Ln& ln, const State& st, acc_t* rec) {
    if (ln.leader[0]) rec[ln.head[0]] = st.g;
  }

  __device__ static void combine(const Layout& l, const Ln& ln, const acc_t* rec, State& st) {
    if (ln.head_ok[0]) st.g += rec[ln.head[0]];
  }

  __device__ static void finalize(const Params& p, const Layout& l, const Ln& ln, int64_t row,
                                  const State& st) {
    if (ln.leader[0]) p.gsd[row * l.H + ln.head[0]] = static_cast<scalar_t>(st.g);
  }
};

// ----------------------------------------------------------------------------
// Backward pass 2: sources, over the transposed graph.
//   grad score_src_j = sum_i dS_ij,  grad h_j = sum_i a'_ij dOut_i

template <typename scalar_t, typename index_t>
struct Bwd2Params {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* go;
  const DsAp<acc_t>* dsap;
  const index_t* ptr;   // colptr
  const index_t* row;   // csc_row: destination of each CSC position
  const index_t* perm;  // csc_perm: CSR position of each CSC position
  scalar_t* gh;
  scalar_t* gss;
};

template <typename scalar_t, typename index_t, int VEC, int NSLOT>
struct Backward2 {
  using acc_t = at::opmath_type<scalar_t>;
  using Params = Bwd2Params<scalar_t, index_t>;
  using Ln = Lanes<NSLOT>;
  static constexpr int kU = NSLOT == 1 ? 4 : 2;
  struct State {
    acc_t g[NSLOT], acc[NSLOT][VEC];
  };

  // Record: g [H], acc [H * C].
  static int64_t rec_size(const Layout& l) { return l.H + l.HC; }

  __device__ static Ln lanes(const Layout& l, int tile) {
    return make_lanes<NSLOT, false>(l, tile, VEC);
  }

  __device__ static void init(State& st) {
#pragma unroll
    for (int s = 0; s < NSLOT; ++s) {
      st.g[s] = acc_t(0);
#pragma unroll
      for (int v = 0; v < VEC; ++v) st.acc[s][v] = acc_t(0);
    }
  }

  __device__ static void process(const Params& p, const Layout& l, const Ln& ln, int64_t src,
                                 int64_t lo, int64_t hi, State& st) {
    for (int64_t chunk = lo; chunk < hi; chunk += l.G) {
      const int n = static_cast<int>(imin(l.G, hi - chunk));
      long long my_i = 0, my_p = 0;
      if (ln.lane_g < n) {
        my_i = static_cast<long long>(p.row[chunk + ln.lane_g]);
        my_p = static_cast<long long>(p.perm[chunk + ln.lane_g]);
      }
      for (int t = 0; t < n; t += kU) {
        int64_t i[kU], q[kU];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          const int srcl = ln.gbase + (t + u < n ? t + u : n - 1);
          i[u] = __shfl_sync(ln.mask, my_i, srcl);
          q[u] = __shfl_sync(ln.mask, my_p, srcl);
        }
        DsAp<acc_t> da[kU][NSLOT];
        Vec<scalar_t, VEC> gv[kU][NSLOT];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
#pragma unroll
          for (int s = 0; s < NSLOT; ++s) {
            const bool ok = t + u < n && ln.head_ok[s];
            if (ok) {
              da[u][s] = p.dsap[q[u] * l.H + ln.head[s]];
            } else {
              da[u][s].ds = acc_t(0);
              da[u][s].ap = acc_t(0);
            }
            gv[u][s] = ok && ln.vec_ok[s] ? load_vec<scalar_t, VEC>(p.go + i[u] * l.HC + ln.c[s])
                                          : zero_vec<scalar_t, VEC>();
          }
        }
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          if (t + u >= n) break;
#pragma unroll
          for (int s = 0; s < NSLOT; ++s) {
            if (!ln.head_ok[s]) continue;
            st.g[s] += da[u][s].ds;
            const acc_t w = da[u][s].ap;
            if (w == acc_t(0) || !ln.vec_ok[s]) continue;
#pragma unroll
            for (int v = 0; v < VEC; ++v) st.acc[s][v] += w * static_cast<acc_t>(gv[u][s].v[v]);
          }
        }
      }
    }
  }

  __device__ static void store(const Layout& l, const Ln& ln, const State& st, acc_t* rec) {
#pragma unroll
    for (int s = 0; s < NSLOT; ++s) {
      if (ln.leader[s]) rec[ln.head[s]] = st.g[s];
      if (ln.vec_ok[s]) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) rec[l.H + ln.c[s] + v] = st.acc[s][v];
      }
    }
  }

  __device__ static void combine(const Layout& l, const Ln& ln, const acc_t* rec, State& st) {
#pragma unroll
    for (int s = 0; s < NSLOT; ++s) {
      if (!ln.head_ok[s]) continue;
      st.g[s] += rec[ln.head[s]];
      if (ln.vec_ok[s]) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) st.acc[s][v] += rec[l.H + ln.c[s] + v];
      }
    }
  }

  __device__ static void finalize(const Params& p, const Layout& l, const Ln& ln, int64_t src,
                                  const State& st) {
#pragma unroll
    for (int s = 0; s < NSLOT; ++s) {
      if (ln.vec_ok[s]) store_vec<scalar_t, VEC>(p.gh + src * l.HC + ln.c[s], st.acc[s], acc_t(1));
      if (ln.leader[s]) p.gss[src * l.H + ln.head[s]] = static_cast<scalar_t>(st.g[s]);
    }
  }
};

// ----------------------------------------------------------------------------
// The generic tree-reduction kernels.

// Merges, in order, the records of level `lvl` that hold the part of the row
// [beg, end) lying in child segments [cmin, cmax]. A segment c meets a row longer
// than its length either at the segment's first entry (record slot 0) or, when
// the row starts inside it, at its last entry (slot 1).
template <class M>
__device__ __forceinline__ void merge_children(const Layout& l, const typename M::Ln& ln,
                                               const Tree& tree, int lvl, int64_t beg, int64_t end,
                                               int64_t cmin, int64_t cmax,
                                               typename M::State& st) {
  using acc_t = typename M::acc_t;
  const int64_t Lc = tree.L[lvl];
  const acc_t* recs = static_cast<const acc_t*>(tree.records) + tree.off[lvl];
  const int64_t c0 = imax(beg / Lc, cmin);
  const int64_t c1 = imin((end - 1) / Lc, cmax);
  for (int64_t c = c0; c <= c1; ++c) {
    const int slot = beg <= c * Lc ? 0 : 1;
    M::combine(l, ln, recs + (c * 2 + slot) * tree.rec, st);
  }
}

// One group per (segment of level `level`, tile): the records of the (at most
// two) rows longer than the segment that meet it. Level 0 reads edges; level
// k > 0 merges the kFanIn level k-1 records below it.
template <class M>
__global__ void __launch_bounds__(kBlock)
    tree_level_kernel(const typename M::Params p, const Layout l, const Tree tree, const int level) {
  using acc_t = typename M::acc_t;
  const int64_t gtid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t task = gtid / l.G;
  const int64_t seg = task / l.tiles;
  if (seg >= tree.S[level]) return;  // uniform over the group
  const int tile = static_cast<int>(task - seg * l.tiles);
  const auto ln = M::lanes(l, tile);
  const int64_t Lk = tree.L[level];
  const int64_t a = seg * Lk;
  const int64_t b = imin(a + Lk, tree.E);
  acc_t* recs = static_cast<acc_t*>(tree.records) + tree.off[level];

  const int64_t r0 = find_row(p.ptr, 0, tree.n, a);
  const int64_t beg0 = p.ptr[r0], end0 = p.ptr[r0 + 1];
  if (end0 - beg0 > Lk) {
    typename M::State st;
    M::init(st);
    if (level == 0)
      M::process(p, l, ln, r0, a, imin(end0, b), st);
    else
      merge_children<M>(l, ln, tree, level - 1, beg0, end0, seg * kFanIn,
                        seg * kFanIn + kFanIn - 1, st);
    M::store(l, ln, st, recs + (seg * 2) * tree.rec);
  }
  if (b - 1 >= end0) {  // another row holds the segment's last entry
    const int64_t r1 = find_row(p.ptr, r0 + 1, tree.n, b - 1);
    const int64_t beg1 = p.ptr[r1], end1 = p.ptr[r1 + 1];
    if (end1 - beg1 > Lk) {
      typename M::State st;
      M::init(st);
      if (level == 0)
        M::process(p, l, ln, r1, beg1, b, st);
      else
        merge_children<M>(l, ln, tree, level - 1, beg1, end1, seg * kFanIn,
                          seg * kFanIn + kFanIn - 1, st);
      M::store(l, ln, st, recs + (seg * 2 + 1) * tree.rec);
    }
  }
}

// One group per (row, tile): short rows are reduced here directly, long rows
// merge the records of the deepest level they span more than one segment of.
template <class M>
__global__ void __launch_bounds__(kBlock)
    tree_row_kernel(const typename M::Params p, const Layout l, const Tree tree) {
  const int64_t gtid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t task = gtid / l.G;
  const int64_t row = task / l.tiles;
  if (row >= tree.n) return;  // uniform over the group
  const int tile = static_cast<int>(task - row * l.tiles);
  const auto ln = M::lanes(l, tile);
  const int64_t beg = p.ptr[row], end = p.ptr[row + 1];
  const int64_t deg = end - beg;
  typename M::State st;
  M::init(st);
  if (tree.K == 0 || deg <= tree.L[0]) {
    M::process(p, l, ln, row, beg, end, st);
  } else {
    int k = 0;
    while (k + 1 < tree.K && deg > tree.L[k + 1]) ++k;
    merge_children<M>(l, ln, tree, k, beg, end, 0, tree.S[k] - 1, st);
  }
  M::finalize(p, l, ln, row, st);
}

unsigned int grid_for(int64_t groups, int G) {
  const int64_t blocks = ceil_div(groups * G, kBlock);
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(),
              "neptune::gat (CUDA): problem too large for one launch");
  return static_cast<unsigned int>(blocks);
}

// Runs the leaf and merge levels, then the row kernel, on `stream`.
template <class M>
void run_tree(const typename M::Params& p, const Layout& l, int64_t n, int64_t E,
              const at::TensorOptions& acc_opts, cudaStream_t stream) {
  if (n == 0) return;
  Tree tree = make_tree(n, E, M::rec_size(l));
  at::Tensor records;  // freed after the launches: the caching allocator orders reuse on `stream`
  if (tree.K > 0) {
    records = new_tensor({tree.total}, acc_opts);
    tree.records = records.data_ptr();
  }
  for (int k = 0; k < tree.K; ++k) {
    NEPTUNE_LAUNCH(tree_level_kernel<M>, grid_for(tree.S[k] * l.tiles, l.G), stream, p, l, tree, k);
  }
  NEPTUNE_LAUNCH(tree_row_kernel<M>, grid_for(n * l.tiles, l.G), stream, p, l, tree);
}

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// Elements per 16-byte vector; fp64 uses scalars (it is there for gradcheck).
template <typename scalar_t>
constexpr int vec_width() {
  return sizeof(scalar_t) >= 8 ? 1 : static_cast<int>(16 / sizeof(scalar_t));
}

// Forward / pass 2: one slot per thread when a group covers the whole row, else two
// slots (and as many tiles as needed); scalars when C or the alignment forbids vectors.
template <template <typename, typename, int, int> class M, typename scalar_t, typename index_t>
void run_wide(const typename M<scalar_t, index_t, 1, 2>::Params& p, int64_t H, int64_t C,
              bool vec_ok, int64_t n, int64_t E, const at::TensorOptions& acc_opts,
              cudaStream_t stream) {
  constexpr int kVec = vec_width<scalar_t>();
  if constexpr (kVec > 1) {
    if (vec_ok && C % kVec == 0) {
      const Layout l1 = make_layout(H, C, kVec, 1, false);
      if (l1.units <= 1)
        run_tree<M<scalar_t, index_t, kVec, 1>>(p, l1, n, E, acc_opts, stream);
      else
        run_tree<M<scalar_t, index_t, kVec, 2>>(p, make_layout(H, C, kVec, 2, false), n, E,
                                                acc_opts, stream);
      return;
    }
  }
  run_tree<M<scalar_t, index_t, 1, 2>>(p, make_layout(H, C, 1, 2, false), n, E, acc_opts,
                                       stream);
}


void check_cuda(const at::Tensor& t, const at::Tensor& h, const char* name) {
#ifdef NEPTUNE_CUDA_EMULATION
  const bool ok = t.device() == h.device();
#else
  const bool ok = t.is_cuda() && t.device() == h.device();
#endif
  TORCH_CHECK(ok, "neptune::gat (CUDA): ", name,
              " must be on ", h.device(), ", got ", t.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gat_forward_cuda(
    const at::Tensor& h, const at::Tensor& score_src, const at::Tensor& score_dst,
    const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& eid,
    const at::Tensor& colptr, const at::Tensor& csc_row, const at::Tensor& csc_perm,
    const std::optional<at::Tensor>& edge_logits, double negative_slope, double dropout,
    const std::optional<at::Tensor>& seed) {
  check_gat_inputs(h, score_src, score_dst, rowptr, col, eid, edge_logits, negative_slope, dropout);
  check_cuda(h, h, "h");
  check_cuda(score_src, h, "score_src");
  check_cuda(score_dst, h, "score_dst");
  check_cuda(rowptr, h, "rowptr");
  check_cuda(col, h, "col");
  check_cuda(eid, h, "eid");
  if (edge_logits.has_value()) check_cuda(*edge_logits, h, "edge_logits");
  const uint64_t seed_v = seed_value(seed, dropout);
  const c10::cuda::CUDAGuard guard(h.device());

  const int64_t n_dst = score_dst.size(0), H = h.size(1), C = h.size(2), E = col.size(0);
  at::Tensor out = new_tensor({n_dst, H, C}, h.options());
  at::Tensor lse = new_tensor({n_dst, H}, h.options().dtype(gat_acc_dtype(h.scalar_type())));
  if (n_dst == 0 || H == 0) return {out, lse};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool vec_ok = aligned16(h) && aligned16(out);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "gat_forward_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(col.scalar_type(), "gat_forward_cuda_index", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      FwdParams<scalar_t, index_t> p;
      p.h = h.data_ptr<scalar_t>();
      p.ss = score_src.data_ptr<scalar_t>();
      p.sd = score_dst.data_ptr<scalar_t>();
      p.el = edge_logits.has_value() ? edge_logits->data_ptr<scalar_t>() : nullptr;
      p.ptr = rowptr.data_ptr<index_t>();
      p.col = col.data_ptr<index_t>();
      p.eid = eid.data_ptr<index_t>();
      p.out = out.data_ptr<scalar_t>();
      p.lse = lse.data_ptr<acc_t>();
      p.slope = static_cast<acc_t>(negative_slope);
      p.dropout = dropout > 0.0;
      p.p = static_cast<float>(dropout);
      p.keep_scale = dropout_keep_scale<acc_t>(dropout);
      p.seed = seed_v;
      run_wide<Forward, scalar_t, index_t>(p, H, C, vec_ok, n_dst, E, lse.options(), stream);
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gat_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& score_src,
    const at::Tensor& score_dst, const at::Tensor& rowptr, const at::Tensor& col,
    const at::Tensor& eid, const at::Tensor& colptr, const at::Tensor& csc_row,
    const at::Tensor& csc_perm, const std::optional<at::Tensor>& edge_logits,
    const at::Tensor& out, const at::Tensor& lse, double negative_slope, double dropout,
    const std::optional<at::Tensor>& seed) {
  check_gat_inputs(h, score_src, score_dst, rowptr, col, eid, edge_logits, negative_slope, dropout);
  check_gat_backward_graph(col, colptr, csc_row, csc_perm, h.size(0));
  const int64_t n_src = h.size(0), n_dst = score_dst.size(0), H = h.size(1), C = h.size(2),
                E = col.size(0);
  check_gat_backward_tensors(grad_out, out, lse, h, n_dst);
  for (const auto& [t, name] :
       {std::pair<const at::Tensor&, const char*>{h, "h"}, {grad_out, "grad_out"},
        {score_src, "score_src"}, {score_dst, "score_dst"}, {rowptr, "rowptr"}, {col, "col"},
        {eid, "eid"}, {colptr, "colptr"}, {csc_row, "csc_row"}, {csc_perm, "csc_perm"},
        {out, "out"}, {lse, "lse"}})
    check_cuda(t, h, name);
  if (edge_logits.has_value()) check_cuda(*edge_logits, h, "edge_logits");
  const uint64_t seed_v = seed_value(seed, dropout);
  const c10::cuda::CUDAGuard guard(h.device());

  const at::Tensor go = grad_out.contiguous();
  const at::Tensor out_c = out.contiguous();
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor gh = new_tensor(h.sizes(), h.options());
  at::Tensor gss = new_tensor(score_src.sizes(), h.options());
  at::Tensor gsd = new_tensor(score_dst.sizes(), h.options());
  at::Tensor gel = edge_logits.has_value() ? new_tensor(edge_logits->sizes(), h.options())
                                           : at::empty({0}, h.options());
  if (H == 0) return {gh, gss, gsd, gel};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool vec_ok = aligned16(h) && aligned16(go) && aligned16(out_c) && aligned16(gh);
  // (dS, a') per (CSR position, head): the one E x H intermediate, backward only.
  at::Tensor dsap = new_tensor({E, H, 2}, lse_c.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "gat_backward_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(col.scalar_type(), "gat_backward_cuda_index", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      constexpr int kVec = vec_width<scalar_t>();
      DsAp<acc_t>* dsap_p = reinterpret_cast<DsAp<acc_t>*>(dsap.data_ptr<acc_t>());

      Bwd1Params<scalar_t, index_t> p1;
      p1.go = go.data_ptr<scalar_t>();
      p1.h = h.data_ptr<scalar_t>();
      p1.ss = score_src.data_ptr<scalar_t>();
      p1.sd = score_dst.data_ptr<scalar_t>();
      p1.el = edge_logits.has_value() ? edge_logits->data_ptr<scalar_t>() : nullptr;
      p1.out = out_c.data_ptr<scalar_t>();
      p1.lse = lse_c.data_ptr<acc_t>();
      p1.ptr = rowptr.data_ptr<index_t>();
      p1.col = col.data_ptr<index_t>();
      p1.eid = eid.data_ptr<index_t>();
      p1.dsap = dsap_p;
      p1.gel = edge_logits.has_value() ? gel.data_ptr<scalar_t>() : nullptr;
      p1.gsd = gsd.data_ptr<scalar_t>();
      p1.slope = static_cast<acc_t>(negative_slope);
      p1.dropout = dropout > 0.0;
      p1.p = static_cast<float>(dropout);
      p1.keep_scale = dropout_keep_scale<acc_t>(dropout);
      p1.seed = seed_v;
      bool vec1 = false;
      if constexpr (kVec > 1) {
        if (vec_ok && C % kVec == 0) {
          vec1 = true;
          run_tree<Backward1<scalar_t, index_t, kVec>>(p1, make_layout(H, C, kVec, 1, true),
                                                       n_dst, E, lse_c.options(), stream);
        }
      }
      if (!vec1)
        run_tree<Backward1<scalar_t, index_t, 1>>(p1, make_layout(H, C, 1, 1, true), n_dst, E,
                                                  lse_c.options(), stream);

      Bwd2Params<scalar_t, index_t> p2;
      p2.go = go.data_ptr<scalar_t>();
      p2.dsap = dsap_p;
      p2.ptr = colptr.data_ptr<index_t>();
      p2.row = csc_row.data_ptr<index_t>();
      p2.perm = csc_perm.data_ptr<index_t>();
      p2.gh = gh.data_ptr<scalar_t>();
      p2.gss = gss.data_ptr<scalar_t>();
      run_wide<Backward2, scalar_t, index_t>(p2, H, C, vec_ok, n_src, E, lse_c.options(), stream);
    });
  });
  return {gh, gss, gsd, gel};
}

}  // namespace neptune
