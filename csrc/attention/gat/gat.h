// GAT (Velickovic et al. 2018; the semantics of PyG's GATConv) on a graph with given
// logit halves: the kernels' declarations and their shape checks (the rest: attention.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "attention/common/attention.h"

namespace neptune {

inline void check_gat_inputs(const at::Tensor& h, const at::Tensor& score_src,
                             const at::Tensor& score_dst, const at::Tensor& rowptr,
                             const at::Tensor& col, const at::Tensor& eid,
                             const std::optional<at::Tensor>& edge_logits,
                             double negative_slope, double dropout) {
  TORCH_CHECK(h.dim() == 3, "neptune::gat: h must be [N_src, H, C], got ", h.sizes());
  const auto H = h.size(1);
  TORCH_CHECK(score_src.dim() == 2 && score_src.size(0) == h.size(0) &&
                  score_src.size(1) == H,
              "neptune::gat: score_src must be [N_src, H] = [", h.size(0), ", ", H,
              "], got ", score_src.sizes());
  TORCH_CHECK(score_dst.dim() == 2 && score_dst.size(1) == H,
              "neptune::gat: score_dst must be [N_dst, H] with H = ", H, ", got ",
              score_dst.sizes());
  TORCH_CHECK(rowptr.dim() == 1 && rowptr.size(0) == score_dst.size(0) + 1,
              "neptune::gat: rowptr must be [N_dst + 1] = [", score_dst.size(0) + 1,
              "], got ", rowptr.sizes());
  check_attention_args("neptune::gat", {h, score_src, score_dst}, "h, score_src and score_dst",
                       rowptr, col, eid, edge_logits, "edge_logits", {H}, negative_slope,
                       "negative_slope", dropout);
}

// (h, score_src [N_src, H], score_dst [N_dst, H]) -> (out, lse); backward:
// (grad_h, grad_score_src, grad_score_dst, grad_edge_logits). The CUDA kernels
// (graph_attention_{fwd,bwd}_cuda.cu) are declared unconditionally, defined only in CUDA
// builds. The CPU backward takes grad_out and out with fewer rows than the graph: the
// rows past them get no gradient (gat_att's phantom row).
AttentionForward gat_forward_cpu, gat_forward_cuda;
AttentionBackward gat_backward_cpu, gat_backward_cuda;

// GAT with the logit halves <h, att_src>, <h, att_dst> computed inside (gat_att.cpp):
// sources and destinations are the same N nodes; rowptr may have more than N rows (the
// phantom row of removed self loops), whose outputs are dropped. The same calling
// convention with (h, att_src [H, C], att_dst [H, C]); out is [N, H, C], lse keeps every
// row. Composed from the kernels above: registered for CPU and CUDA.
AttentionForward gat_att_forward;
AttentionBackward gat_att_backward;

}  // namespace neptune
