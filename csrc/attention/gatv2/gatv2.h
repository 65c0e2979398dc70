// GATv2 (dynamic attention, Brody et al. 2022; the semantics of PyG's GATv2Conv):
//
//   z_ij  = x_l[j] + x_r[i] (+ edge_feat[e(i,j)])             [H, C]
//   s_ij  = sum_c att[h, c] * LeakyReLU(z_ij[h, c])           per head h
//   a_ij  = softmax over j in N(i) of s_ij
//   out_i = sum_j a_ij x_l[j]                                  (no in-edges: 0)
//
// x_l, x_r and out are [N, H, C] or, as a Linear layer returns them, [N, H * C]; H and C
// come from att ([H, C] or the layer's [1, H, C]); out has the shape of x_r.
//
// Same kernel shape as GAT v1: the row x_l[j] gathered for the sum also gives the
// logit, one pass per destination with an online softmax; only out and the
// log-sum-exp are saved. The CSR may have more rows than x_r: the extra rows
// (GATConv's phantom row of removed self loops) are ignored - their edges get no
// weight, no output and no gradient.
//
// Backward, with D_i = <dOut_i, out_i> and dS_ij = a'_ij <dOut_i, x_l[j]> - a_ij D_i:
//   dz_ij           = dS_ij * att * LeakyReLU'(z_ij)
//   grad x_r[i]     = sum_j dz_ij                       (pass 1, destinations)
//   grad edge_feat  = dz_ij                             (pass 1)
//   grad att        = sum_ij dS_ij * LeakyReLU(z_ij)    (pass 1: fixed blocks of
//                     destinations, then the blocks in order: no atomics)
//   grad x_l[j]     = sum_i a'_ij dOut_i + dz_ij         (pass 2, sources, CSC)
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "attention/common/attention.h"

namespace neptune {

// Destinations per block of the fixed-order grad-att reduction (a constant, so the
// summation order does not depend on the thread count or the device).
constexpr int64_t kGatv2AttBlock = 64;

inline void check_gatv2_inputs(const at::Tensor& xl, const at::Tensor& xr, const at::Tensor& att,
                               const at::Tensor& rowptr, const at::Tensor& col,
                               const at::Tensor& eid,
                               const std::optional<at::Tensor>& edge_feat,
                               double negative_slope, double dropout) {
  TORCH_CHECK(att.dim() == 2 || (att.dim() == 3 && att.size(0) == 1),
              "neptune::gatv2: att must be [H, C] or [1, H, C], got ", att.sizes());
  const auto H = att.size(-2), C = att.size(-1);
  TORCH_CHECK((xl.dim() == 3 && xl.size(1) == H && xl.size(2) == C) ||
                  (xl.dim() == 2 && xl.size(1) == H * C),
              "neptune::gatv2: x_l must be [N_src, H, C] or [N_src, H * C] with H, C = ", H, ", ",
              C, " (the shape of att), got ", xl.sizes());
  TORCH_CHECK(xr.dim() == xl.dim() && xr.sizes().slice(1) == xl.sizes().slice(1),
              "neptune::gatv2: x_r must be [N_dst, ", xl.sizes().slice(1), "] like x_l, got ",
              xr.sizes());
  TORCH_CHECK(rowptr.dim() == 1 && rowptr.size(0) >= xr.size(0) + 1,
              "neptune::gatv2: rowptr must be [R + 1] with R >= N_dst = ", xr.size(0), ", got ",
              rowptr.sizes());
  check_attention_args("neptune::gatv2", {xl, xr, att}, "x_l, x_r and att", rowptr, col, eid,
                       edge_feat, "edge_feat", {H, C}, negative_slope, "negative_slope", dropout);
}

// Heads and channels: att's last two dimensions.
inline std::pair<int64_t, int64_t> gatv2_heads(const at::Tensor& att) {
  return {att.size(-2), att.size(-1)};
}

// What every GATv2 kernel entry (CPU and CUDA, forward and backward) checks first:
// shapes and dtypes, then the graph (graph/graph.h; rows beyond x_r are allowed).
inline void check_gatv2_entry(const at::Tensor& xl, const at::Tensor& xr, const at::Tensor& att,
                              const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& eid,
                              const std::optional<at::Tensor>& edge_feat, double negative_slope,
                              double dropout, const char* op) {
  check_gatv2_inputs(xl, xr, att, rowptr, col, eid, edge_feat, negative_slope, dropout);
  check_csr(rowptr, col, eid, xl.size(0), rowptr.size(0) - 1, op);
}

// (x_l [N_src, H, C], x_r [N_dst, H, C], att [H, C]) -> (out, lse); backward:
// (grad_x_l, grad_x_r, grad_att, grad_edge_feat). The CUDA kernels (gatv2_{fwd,bwd}_cuda.cu;
// H * C <= 1024) are declared unconditionally, defined only in CUDA builds.
AttentionForward gatv2_forward_cpu, gatv2_forward_cuda;
AttentionBackward gatv2_backward_cpu, gatv2_backward_cuda;

}  // namespace neptune
