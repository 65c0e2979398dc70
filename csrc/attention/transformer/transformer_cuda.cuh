// Fused graph-transformer attention on CUDA (semantics and passes: transformer.h; the
// same math header as the CPU kernel, transformer_cpu.cpp).
//
// Work layout (attention/common/warp_row_cuda.cuh): one warp per row - a destination in the
// forward and in backward pass 1, a source in pass 2 - with NF features per lane, so
// H * C <= kTransformerMaxHC. A head's logit scale * <q_i, k_j (+ e)> is a per-lane
// product summed over the head's lanes by head_sum; every lane of a head ends with the
// same bits, so all of them take the same online-softmax steps. q_i (scaled), and in
// backward dOut_i, stay in registers for the whole row; k_j, v_j (and e) are gathered
// once per edge as coalesced runs. Nothing uses floating-point atomics: each output
// element has one writer, so results are bitwise reproducible.
//
// This header holds what the forward (transformer_fwd_cuda.cu) and the backward
// (transformer_bwd_cuda.cu) share: the params struct and the entry checks. Two
// translation units, compiled in parallel.
#pragma once

#include "attention/common/warp_row_cuda.cuh"
#include "attention/transformer/transformer.h"

namespace neptune {
namespace {

// The widest row a warp holds in registers (32 lanes x 32 features).
constexpr int64_t kTransformerMaxHC = kWarpRowMaxHC;

template <typename scalar_t, typename index_t>
struct TransformerParams : WarpRowParams<scalar_t, index_t> {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* q;
  const scalar_t* k;
  const scalar_t* v;
  scalar_t* gq;
  scalar_t* gk;
  scalar_t* gv;
  acc_t* aw;       // backward: [E, H] a (before dropout), pass 1 -> pass 2
  acc_t* row_d;    // backward: [N_dst, H] D / A
  acc_t* row_inv;  // backward: [N_dst, H] 1 / A
  int64_t n_src;
  acc_t scale;
};

// The entry checks of transformer.h, plus: every tensor on q's device, rows a warp can hold.
inline void check_transformer_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& rowptr, const at::Tensor& col,
                                   const at::Tensor& eid,
                                   const std::optional<at::Tensor>& edge_feat, double scale,
                                   double dropout, const char* op) {
  check_on_device(op, {{q, "q"}, {k, "k"}, {v, "v"}, {rowptr, "rowptr"}, {col, "col"}, {eid, "eid"}},
                  edge_feat, "edge_feat");
  check_transformer_entry(q, k, v, rowptr, col, eid, edge_feat, scale, dropout, op);
  TORCH_CHECK(q.size(2) > 0 && q.size(1) * q.size(2) <= kTransformerMaxHC, op,
              " (CUDA): H * C must be in [1, ", kTransformerMaxHC,
              "] (one warp holds a row in registers), got H = ", q.size(1), ", C = ", q.size(2));
}

// The fields forward and backward share.
template <typename scalar_t, typename index_t>
TransformerParams<scalar_t, index_t> transformer_params(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& edge_feat, const at::Tensor& rowptr, const at::Tensor& col,
    const at::Tensor& eid, double scale, double dropout, uint64_t seed) {
  TransformerParams<scalar_t, index_t> p{};
  fill_warp_row_params(p, edge_feat, rowptr, col, eid, q.size(0), q.size(1), q.size(2), dropout, seed);
  p.q = q.data_ptr<scalar_t>();
  p.k = k.data_ptr<scalar_t>();
  p.v = v.data_ptr<scalar_t>();
  p.n_src = k.size(0);
  p.scale = static_cast<at::opmath_type<scalar_t>>(scale);
  return p;
}

}  // namespace
}  // namespace neptune
