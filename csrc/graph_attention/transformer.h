// Graph-transformer attention (Shi et al. 2021, "UniMP"; the semantics of PyG's
// TransformerConv), per head h:
//
//   k'_ij = k[j] (+ edge_feat[e(i,j)]),   v'_ij = v[j] (+ edge_feat[e(i,j)])   [H, C]
//   s_ij  = scale * <q[i], k'_ij>                         (scale: 1/sqrt(C) in the layer)
//   a_ij  = softmax over j in N(i) of s_ij
//   out_i = sum_j a'_ij v'_ij                              (a' = a after dropout; no in-edges: 0)
//
// Forward: one pass per destination with an online softmax; q[i] is read once per
// row, k[j] and v[j] gathered once per edge; only out and the log-sum-exp are saved.
// Nothing of size E x H x C is allocated.
//
// Backward, with D_i = <dOut_i, out_i>, g_ij = m_ij <dOut_i, v'_ij> (m: the dropout
// factor) and dS_ij = a_ij (g_ij - D_i):
//   pass 1, sources (CSC): k[j] and v[j] stay in registers, q[i] and dOut_i are gathered
//     once per edge and give a_ij (from the saved log-sum-exp), dS_ij and
//       grad k[j]       = scale sum_i dS_ij q[i]
//       grad v[j]       = sum_i a'_ij dOut_i
//   pass 2, destinations (CSR): k[j] gathered once per edge,
//       grad q[i]       = scale sum_j dS_ij k'_ij
//       grad edge_feat  = scale dS_ij q[i] + a'_ij dOut_i      (each edge written once,
//                         where pass 2 reads edge_feat)
// Three rows gathered per edge in all (edge features: read in both passes). dS (and a')
// travel from pass 1 to pass 2 as E x H scratch. No atomics: bitwise deterministic for any
// thread count. The CSR has exactly N_dst rows. With bfloat16/float16 inputs, D_i is summed
// from the edges in float32 (a rounded `out` would leave each row's dS summing to a residue).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <tuple>

#include "common.h"
#include "graph/graph.h"

namespace neptune {

inline void check_transformer_entry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& rowptr, const at::Tensor& col,
                                    const at::Tensor& eid,
                                    const std::optional<at::Tensor>& edge_feat, double scale,
                                    double dropout, const char* op) {
  TORCH_CHECK(q.dim() == 3, op, ": q must be [N_dst, H, C], got ", q.sizes());
  const auto H = q.size(1), C = q.size(2);
  TORCH_CHECK(k.dim() == 3 && k.size(1) == H && k.size(2) == C, op,
              ": k must be [N_src, H, C] with H = ", H, ", C = ", C, ", got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v must have the shape of k, ", k.sizes(), ", got ",
              v.sizes());
  TORCH_CHECK(rowptr.dim() == 1 && rowptr.size(0) == q.size(0) + 1, op,
              ": rowptr must be [N_dst + 1] = [", q.size(0) + 1, "], got ", rowptr.sizes());
  TORCH_CHECK(col.dim() == 1 && eid.dim() == 1 && eid.size(0) == col.size(0), op,
              ": col and eid must be [E] vectors of the same length");
  TORCH_CHECK(rowptr.scalar_type() == col.scalar_type() && eid.scalar_type() == col.scalar_type(),
              op, ": rowptr, col and eid must share one integer dtype");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must share one dtype");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() &&
                  rowptr.is_contiguous() && col.is_contiguous() && eid.is_contiguous(),
              op, ": inputs must be contiguous");
  if (edge_feat.has_value()) {
    const auto& ef = *edge_feat;
    TORCH_CHECK(ef.dim() == 3 && ef.size(0) == col.size(0) && ef.size(1) == H && ef.size(2) == C,
                op, ": edge_feat must be [E, H, C] = [", col.size(0), ", ", H, ", ", C, "], got ",
                ef.sizes());
    TORCH_CHECK(ef.scalar_type() == q.scalar_type() && ef.is_contiguous(), op,
                ": edge_feat must be contiguous with the dtype of q");
  }
  TORCH_CHECK(dropout >= 0.0 && dropout < 1.0, op, ": dropout must be in [0, 1), got ", dropout);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  check_csr(rowptr, col, eid, k.size(0), q.size(0), op);
}

inline void check_transformer_backward_tensors(const at::Tensor& grad_out, const at::Tensor& out,
                                               const at::Tensor& lse, const at::Tensor& q) {
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(),
              "neptune::transformer_backward: out must be [N_dst, H, C] like q, got ", out.sizes());
  TORCH_CHECK(grad_out.sizes() == out.sizes() && grad_out.scalar_type() == out.scalar_type(),
              "neptune::transformer_backward: grad_out must match out in shape and dtype");
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                  lse.scalar_type() == acc_dtype(q.scalar_type()),
              "neptune::transformer_backward: lse must be [N_dst, H] in ", acc_dtype(q.scalar_type()),
              ", got ", lse.sizes(), " ", lse.scalar_type());
}

// Forward: (out [N_dst, H, C], lse [N_dst, H] in float32/float64).
std::tuple<at::Tensor, at::Tensor> transformer_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rowptr,
    const at::Tensor& col, const at::Tensor& eid, const at::Tensor& colptr,
    const at::Tensor& csc_row, const at::Tensor& csc_perm,
    const std::optional<at::Tensor>& edge_feat, double scale, double dropout,
    const std::optional<at::Tensor>& seed);

// Backward: (grad_q, grad_k, grad_v, grad_edge_feat).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> transformer_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& eid,
    const at::Tensor& colptr, const at::Tensor& csc_row, const at::Tensor& csc_perm,
    const std::optional<at::Tensor>& edge_feat, const at::Tensor& out, const at::Tensor& lse,
    double scale, double dropout, const std::optional<at::Tensor>& seed);

// CUDA kernels (transformer_fwd_cuda.cu, transformer_bwd_cuda.cu), same signatures and
// semantics; H * C <= 1024 (one warp holds a row: transformer_cuda.cuh).
// Declared unconditionally, defined only in CUDA builds.
std::tuple<at::Tensor, at::Tensor> transformer_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rowptr,
    const at::Tensor& col, const at::Tensor& eid, const at::Tensor& colptr,
    const at::Tensor& csc_row, const at::Tensor& csc_perm,
    const std::optional<at::Tensor>& edge_feat, double scale, double dropout,
    const std::optional<at::Tensor>& seed);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> transformer_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& eid,
    const at::Tensor& colptr, const at::Tensor& csc_row, const at::Tensor& csc_perm,
    const std::optional<at::Tensor>& edge_feat, const at::Tensor& out, const at::Tensor& lse,
    double scale, double dropout, const std::optional<at::Tensor>& seed);

}  // namespace neptune
