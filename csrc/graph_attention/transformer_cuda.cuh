// Fused graph-transformer attention on CUDA (semantics and passes: transformer.h; the
// same math header as the CPU kernel, transformer_cpu.cpp).
//
// Work layout (attention_cuda_common.cuh): one warp per row - a destination in the
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

#include "attention_cuda_common.cuh"
#include "transformer.h"

namespace neptune {
namespace {

// The widest row a warp holds in registers (32 lanes x 32 features).
constexpr int64_t kTransformerMaxHC = kWarpRowMaxHC;

template <typename scalar_t, typename index_t>
struct TransformerParams {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* q;
  const scalar_t* k;
  const scalar_t* v;
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
  scalar_t* gq;
  scalar_t* gk;
  scalar_t* gv;
  scalar_t* gef;  // nullable
  int64_t n_dst, n_src, H, C, HC;
  acc_t scale, keep_scale;
  float p;
  uint64_t seed;
  bool dropout;
};

// The entry checks of transformer.h, plus: every tensor on q's device, rows a warp can hold.
inline void check_transformer_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& rowptr, const at::Tensor& col,
                                   const at::Tensor& eid,
                                   const std::optional<at::Tensor>& edge_feat, double scale,
                                   double dropout, const char* op) {
  check_cuda(q, q, "q");
  check_cuda(k, q, "k");
  check_cuda(v, q, "v");
  check_cuda(rowptr, q, "rowptr");
  check_cuda(col, q, "col");
  check_cuda(eid, q, "eid");
  if (edge_feat.has_value()) check_cuda(*edge_feat, q, "edge_feat");
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
  using acc_t = at::opmath_type<scalar_t>;
  TransformerParams<scalar_t, index_t> p{};
  p.q = q.data_ptr<scalar_t>();
  p.k = k.data_ptr<scalar_t>();
  p.v = v.data_ptr<scalar_t>();
  p.ef = edge_feat.has_value() ? edge_feat->data_ptr<scalar_t>() : nullptr;
  p.rowptr = rowptr.data_ptr<index_t>();
  p.col = col.data_ptr<index_t>();
  p.eid = eid.data_ptr<index_t>();
  p.n_dst = q.size(0);
  p.n_src = k.size(0);
  p.H = q.size(1);
  p.C = q.size(2);
  p.HC = p.H * p.C;
  p.scale = static_cast<acc_t>(scale);
  p.dropout = dropout > 0.0;
  p.p = static_cast<float>(dropout);
  p.keep_scale = dropout_keep_scale<acc_t>(dropout);
  p.seed = seed;
  return p;
}

}  // namespace
}  // namespace neptune
