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

#include "attention/common/attention.h"

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
  check_attention_args(op, {q, k, v}, "q, k and v", rowptr, col, eid, edge_feat, "edge_feat",
                       {H, C}, scale, "scale", dropout);
  check_csr(rowptr, col, eid, k.size(0), q.size(0), op);
}

// (q [N_dst, H, C], k [N_src, H, C], v [N_src, H, C]) -> (out, lse); backward:
// (grad_q, grad_k, grad_v, grad_edge_feat). The CUDA kernels (transformer_{fwd,bwd}_cuda.cu;
// H * C <= 1024: one warp holds a row) are declared unconditionally, defined only in CUDA
// builds.
AttentionForward transformer_forward_cpu, transformer_forward_cuda;
AttentionBackward transformer_backward_cpu, transformer_backward_cuda;

}  // namespace neptune
