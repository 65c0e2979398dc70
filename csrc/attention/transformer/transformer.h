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
// The CUDA backward (transformer_bwd_cuda.cu) takes the passes the other way round, as the
// edge-feature kernel below does: destinations first, one walk per row (k and v gathered
// once per edge) with the rebuilt weights normalized by their sum and grad q summed against
// the row's first key, so lse's rounding leaves nothing in grad q; then the sources.
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

// The graph transformer with its edge features projected inside (PyG's TransformerConv with
// edge_dim: e_ij = W_e edge_attr[e], added to the key and the value), per head h:
//
//   s_ij  = scale * <q[i], k[j] + W_e[h] a_e>  = <q~_i, k[j]> + <W_e[h]^T q~_i, a_e>
//   out_i = sum_j a'_ij (v[j] + W_e[h] a_e)     = sum_j a'_ij v[j] + W_e[h] sum_j a'_ij a_e
//
// with q~ = scale q, a_e = edge_attr[e] (D values) and W_e [H, C, D]: the projection moves
// through the dot product and the sum, so per edge only D-wide terms are computed (per
// row, W_e^T q~_i and W_e^T dOut_i), and nothing of size E x H x C exists - TransformerConv
// and the plain op above both hold lin_edge(edge_attr) [E, H * C]. k and v come as one
// tensor kv [N_src, 2, H, C] (one GEMM of the layer gives both). Backward: a destination
// pass (per edge a, a' and g, D_i = sum_j a'_ij g_ij summed from those same products, then
// dS, grad q, grad a_e, and u_i = sum_j dS_ij a_e, t_i = sum_j a'_ij a_e per head) and a
// source pass over the CSC (grad k, grad v from the stored dS and a'):
//   grad q[i]     = scale (sum_j dS_ij k[j] + W_e u_i)
//   grad W_e[h]   = sum_i scale q_i[h] u_i[h]^T + dOut_i[h] t_i[h]^T   (fixed blocks of
//                   destinations, then the blocks in order: no atomics)
//   grad a_e      = sum_h dS_ij[h] W_e[h]^T q~_i[h] + a'_ij[h] W_e[h]^T dOut_i[h]
// Without edge_attr it is the plain op on kv (W_e then gets a zero gradient). CPU only: on
// CUDA the layer projects the edges and calls the plain op.
inline void check_transformer_edge_entry(const at::Tensor& q, const at::Tensor& kv,
                                         const at::Tensor& w, const at::Tensor& rowptr,
                                         const at::Tensor& col, const at::Tensor& eid,
                                         const std::optional<at::Tensor>& edge_attr,
                                         double scale, double dropout, const char* op) {
  TORCH_CHECK(q.dim() == 3, op, ": q must be [N_dst, H, C], got ", q.sizes());
  const auto H = q.size(1), C = q.size(2);
  TORCH_CHECK(kv.dim() == 4 && kv.size(1) == 2 && kv.size(2) == H && kv.size(3) == C, op,
              ": kv must be [N_src, 2, H, C] with H = ", H, ", C = ", C, ", got ", kv.sizes());
  TORCH_CHECK(w.dim() == 3 && w.size(0) == H && w.size(1) == C, op,
              ": w_edge must be [H, C, D] with H = ", H, ", C = ", C, ", got ", w.sizes());
  TORCH_CHECK(rowptr.dim() == 1 && rowptr.size(0) == q.size(0) + 1, op,
              ": rowptr must be [N_dst + 1] = [", q.size(0) + 1, "], got ", rowptr.sizes());
  check_attention_args(op, {q, kv, w}, "q, kv and w_edge", rowptr, col, eid, edge_attr,
                       "edge_attr", {w.size(2)}, scale, "scale", dropout);
  check_csr(rowptr, col, eid, kv.size(0), q.size(0), op);
}

// (q [N_dst, H, C], kv [N_src, 2, H, C], w_edge [H, C, D]), edge_attr [E, D] -> (out, lse);
// backward: (grad_q, grad_kv, grad_w_edge, grad_edge_attr). CPU only.
AttentionForward transformer_edge_forward_cpu;
AttentionBackward transformer_edge_backward_cpu;

}  // namespace neptune
