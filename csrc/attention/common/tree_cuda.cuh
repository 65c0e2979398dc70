// The hub-splitting record tree: reductions over the rows of a CSR-like structure
// (ptr [n + 1], E entries) where a row of any degree is spread over many groups, with
// the group work layout, the edge-chunk loader and the launchers. A variant supplies a
// reduction class M (its record, its per-edge step and its merge); GAT's are in
// attention/gat/gat_{fwd,bwd}_cuda.cu, which run three reductions:
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
#pragma once

#include "attention/common/cuda.cuh"

namespace neptune {
namespace {

#ifndef NEPTUNE_TREE_FAN_IN  // (the CPU emulation tests shrink these to get deep trees)
#define NEPTUNE_TREE_FAN_IN 32
#define NEPTUNE_TREE_MIN_LEAF 256
#endif
constexpr int64_t kFanIn = NEPTUNE_TREE_FAN_IN;  // records merged into one, per tree level
constexpr int kMaxLevels = 16;          // 256 * 32^15 edges: never reached
constexpr int64_t kMinLeaf = NEPTUNE_TREE_MIN_LEAF;  // shortest leaf segment, in edges
constexpr int64_t kMaxLeaves = 65536;   // at most this many leaf segments ...
constexpr int64_t kLeafBudget = int64_t(1) << 24;  // ... and leaves x record <= this


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
// The edge-chunk loader of all three passes: the lanes of a group read the two
// index values (a: neighbour id; b: edge id or CSR position, optional) of up to G
// consecutive edges, one edge per lane; get() hands every lane of the group the
// values of edges t .. t + U - 1 of the chunk by shuffles (past the chunk's end,
// those of its last edge, so every lane runs the same shuffles).

template <typename index_t>
struct EdgeChunk {
  long long my_a = 0, my_b = 0;
  int n;  // edges in this chunk

  template <class Ln>
  __device__ EdgeChunk(const index_t* a, const index_t* b, int64_t first, int n_, const Ln& ln)
      : n(n_) {
    if (ln.lane_g < n) {
      my_a = static_cast<long long>(a[first + ln.lane_g]);
      if (b != nullptr) my_b = static_cast<long long>(b[first + ln.lane_g]);
    }
  }

  template <int U, class Ln>
  __device__ void get(const Ln& ln, int t, bool want_b, int64_t (&a)[U], int64_t (&b)[U]) const {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int src = ln.gbase + (t + u < n ? t + u : n - 1);
      a[u] = __shfl_sync(ln.mask, my_a, src);
      b[u] = want_b ? __shfl_sync(ln.mask, my_b, src) : 0;
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


}  // namespace
}  // namespace neptune
