// The warp-per-row work layout shared by the CUDA kernels of GATv2 (gatv2_cuda.cuh) and
// of the graph transformer (transformer_cuda.cuh).
//
// One warp owns a row (a destination, or a source in a backward pass over the CSC).
// Lane l holds the features f = l + 32 k of the row, k < NF (so H * C <= 32 * NF <=
// kWarpRowMaxHC): every gather of a row is a run of coalesced loads. A per-head sum over
// the C features is spread over lanes (head_sum): when C is a power of two, a butterfly
// over the lanes of each head (plus a sum over the slots of a head when C > 32),
// otherwise one butterfly per head. Every lane of a head ends with the same bits, so
// all of them take the same softmax steps.
#pragma once

#include <type_traits>

#include "attention/common/cuda.cuh"

namespace neptune {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kMaxFeaturesPerLane = 32;                     // the widest layout: NF = 32
constexpr int64_t kWarpRowMaxHC = 32 * kMaxFeaturesPerLane;  // H * C a warp can hold

// Per-slot values -> the sum over each slot's head (identical on the lanes of a head).
// Slots past H * C must hold 0.
template <int NF, bool POW2, typename acc_t>
__device__ __forceinline__ void head_sum(acc_t (&v)[NF], int lane, int64_t C, int64_t H,
                                         int64_t HC) {
  if constexpr (POW2) {
    const int w = C < 32 ? static_cast<int>(C) : 32;
#pragma unroll
    for (int k = 0; k < NF; ++k)
      for (int off = w >> 1; off >= 1; off >>= 1) v[k] += __shfl_xor_sync(kFull, v[k], off);
    if (C > 32) {
      const int spp = static_cast<int>(C / 32);  // slots per head
      acc_t t[NF];
#pragma unroll
      for (int k = 0; k < NF; ++k) t[k] = v[k];
#pragma unroll
      for (int k = 0; k < NF; ++k) {
        acc_t s = 0;
#pragma unroll
        for (int q = 0; q < NF; ++q)
          if (q / spp == k / spp) s += t[q];
        v[k] = s;
      }
    }
  } else {
    acc_t res[NF];
#pragma unroll
    for (int k = 0; k < NF; ++k) res[k] = 0;
    for (int64_t h = 0; h < H; ++h) {
      acc_t s = 0;
#pragma unroll
      for (int k = 0; k < NF; ++k) {
        const int64_t f = lane + 32 * k;
        if (f < HC && f / C == h) s += v[k];
      }
      for (int off = 16; off >= 1; off >>= 1) s += __shfl_xor_sync(kFull, s, off);
#pragma unroll
      for (int k = 0; k < NF; ++k) {
        const int64_t f = lane + 32 * k;
        if (f < HC && f / C == h) res[k] = s;
      }
    }
#pragma unroll
    for (int k = 0; k < NF; ++k) v[k] = res[k];
  }
}

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t ld(const scalar_t* p, bool ok) {
  return ok ? static_cast<acc_t>(*p) : acc_t(0);
}

// Blocks of kBlock threads for one warp per row.
inline int64_t warp_blocks(int64_t rows) { return ceil_div(rows * 32, kBlock); }

// Calls f(NF constant, POW2 constant) for the shape (H * C <= kWarpRowMaxHC).
template <typename F>
void with_layout(int64_t HC, int64_t C, F&& f) {
  const bool pow2 = (C & (C - 1)) == 0;
  const int64_t per_lane = ceil_div(HC, 32);
  auto go = [&](auto nf) {
    if (pow2)
      f(nf, std::true_type{});
    else
      f(nf, std::false_type{});
  };
  static_assert(kMaxFeaturesPerLane == 32, "with_layout's largest case is NF = 32");
  if (per_lane <= 1) go(std::integral_constant<int, 1>{});
  else if (per_lane <= 2) go(std::integral_constant<int, 2>{});
  else if (per_lane <= 4) go(std::integral_constant<int, 4>{});
  else if (per_lane <= 8) go(std::integral_constant<int, 8>{});
  else if (per_lane <= 16) go(std::integral_constant<int, 16>{});
  else go(std::integral_constant<int, 32>{});
}

// The fields the warp-per-row kernels of every variant share (a variant's params
// derive from it and add their own node tensors): the graph, the saved statistics, the
// per-edge scratch, dropout and the shape.
template <typename scalar_t, typename index_t>
struct WarpRowParams {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* ef;   // nullable
  const scalar_t* go;   // backward
  const scalar_t* out;  // backward: the forward's output
  const acc_t* lse_in;  // backward
  const index_t* rowptr;
  const index_t* col;
  const index_t* eid;
  const index_t* colptr;
  const index_t* csc_row;
  const index_t* csc_perm;
  scalar_t* out_w;  // forward
  acc_t* lse;       // forward
  acc_t* ds;        // [E, H] in CSR order, pass 1 -> pass 2
  acc_t* ap;        // [E, H] a' (after dropout)
  scalar_t* gef;    // nullable
  int64_t n_dst, H, C, HC;
  acc_t keep_scale;
  float p;
  uint64_t seed;
  bool dropout;
};

template <typename P>
void fill_warp_row_params(P& p, const std::optional<at::Tensor>& edge_feat, const at::Tensor& rowptr,
                          const at::Tensor& col, const at::Tensor& eid, int64_t n_dst, int64_t H,
                          int64_t C, double dropout, uint64_t seed) {
  using scalar_t = std::remove_const_t<std::remove_pointer_t<decltype(p.ef)>>;
  using index_t = std::remove_const_t<std::remove_pointer_t<decltype(p.rowptr)>>;
  using acc_t = at::opmath_type<scalar_t>;
  p.ef = edge_feat.has_value() ? edge_feat->data_ptr<scalar_t>() : nullptr;
  p.rowptr = rowptr.data_ptr<index_t>();
  p.col = col.data_ptr<index_t>();
  p.eid = eid.data_ptr<index_t>();
  p.n_dst = n_dst;
  p.H = H;
  p.C = C;
  p.HC = H * C;
  p.dropout = dropout > 0.0;
  p.p = static_cast<float>(dropout);
  p.keep_scale = dropout_keep_scale<acc_t>(dropout);
  p.seed = seed;
}

// The backward's shared fields: the incoming gradient, the saved output and
// log-sum-exp, the CSC and the per-edge scratch (dS, a'); gef only with edge features.
template <typename P>
void fill_warp_row_backward(P& p, const at::Tensor& go, const at::Tensor& out, const at::Tensor& lse,
                            const at::Tensor& colptr, const at::Tensor& csc_row,
                            const at::Tensor& csc_perm, const at::Tensor& ds, const at::Tensor& ap,
                            const at::Tensor& gef) {
  using scalar_t = std::remove_const_t<std::remove_pointer_t<decltype(p.ef)>>;
  using index_t = std::remove_const_t<std::remove_pointer_t<decltype(p.rowptr)>>;
  using acc_t = at::opmath_type<scalar_t>;
  p.go = go.data_ptr<scalar_t>();
  p.out = out.data_ptr<scalar_t>();
  p.lse_in = lse.data_ptr<acc_t>();
  p.colptr = colptr.data_ptr<index_t>();
  p.csc_row = csc_row.data_ptr<index_t>();
  p.csc_perm = csc_perm.data_ptr<index_t>();
  p.ds = ds.data_ptr<acc_t>();
  p.ap = ap.data_ptr<acc_t>();
  p.gef = p.ef ? gef.data_ptr<scalar_t>() : nullptr;
}

// The forward pass of the warp-per-row variants: one warp per destination, an online
// softmax per head over its in-edges (every lane of a head takes the same steps), then
// out and lse. The variant V supplies, per slot k of a lane (feature f = lane + 32 k,
// ok = f < H * C):
//   template <int NF, typename acc_t> struct Row      the row's state, loaded once
//   load(Row&, p, row, k, f, ok)                      fill slot k of the row's state
//   edge(const Row&, p, j, edge, k, f, ok, x, val)    slot k's part of the logit (0 when
//                                                     !ok; summed over the head's lanes
//                                                     by head_sum) and of the value
template <typename V, typename scalar_t, int NF, bool POW2, typename P>
__device__ __forceinline__ void warp_forward_row(const P& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (row >= p.n_dst) return;  // the whole warp
  const int64_t H = p.H, C = p.C, HC = p.HC;
  bool ok[NF];
  int head[NF];  // < kWarpRowMaxHC: 32 bits
  typename V::template Row<NF, acc_t> r;
  acc_t acc[NF], m[NF], s[NF];
#pragma unroll
  for (int k = 0; k < NF; ++k) {
    const int64_t f = lane + 32 * k;
    ok[k] = f < HC;
    head[k] = ok[k] ? static_cast<int>(f / C) : 0;
    V::load(r, p, row, k, f, ok[k]);
    acc[k] = 0;
    m[k] = -std::numeric_limits<acc_t>::infinity();
    s[k] = 0;
  }
  const bool need_eid = p.ef != nullptr || p.dropout;
  const int64_t e_end = p.rowptr[row + 1];
  for (int64_t e = p.rowptr[row]; e < e_end; ++e) {
    const int64_t j = p.col[e];
    const int64_t edge = need_eid ? static_cast<int64_t>(p.eid[e]) : 0;
    acc_t x[NF], val[NF];
#pragma unroll
    for (int k = 0; k < NF; ++k) V::edge(r, p, j, edge, k, lane + 32 * k, ok[k], x[k], val[k]);
    head_sum<NF, POW2>(x, lane, C, H, HC);
#pragma unroll
    for (int k = 0; k < NF; ++k) {
      acc_t rescale, w;
      online_softmax_step(x[k], m[k], s[k], rescale, w);
      if (p.dropout) w = dropout_keep(p.seed, edge, head[k], p.p) ? w * p.keep_scale : acc_t(0);
      acc[k] = acc[k] * rescale + w * val[k];
    }
  }
#pragma unroll
  for (int k = 0; k < NF; ++k) {
    const int64_t f = lane + 32 * k;
    if (!ok[k]) continue;
    const bool any = softmax_has_mass(s[k]);
    const acc_t inv = any ? acc_t(1) / s[k] : acc_t(0);
    p.out_w[row * HC + f] = static_cast<scalar_t>(acc[k] * inv);
    if (f % C == 0) p.lse[row * H + head[k]] = any ? m[k] + acc_log(s[k]) : acc_t(0);
  }
}

}  // namespace
}  // namespace neptune
