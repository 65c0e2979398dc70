// Declarations and argument checks shared by the CPU and CUDA graph-attention
// kernels. Python (neptune_ext/ops/graph_attention.py) validates inputs with
// friendly messages first; these TORCH_CHECKs (shapes, dtypes) and the graph
// checks of graph/graph.h (ids, pointers, permutations), which every kernel entry
// runs before its kernel, are the line of defence for callers
// that reach torch.ops.neptune.* directly: a bad call is an exception, never an
// out-of-bounds read.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <tuple>

#include "common.h"
#include "graph/graph.h"  // check_csr / check_csc: every kernel entry runs them

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
  TORCH_CHECK(col.dim() == 1 && eid.dim() == 1 && eid.size(0) == col.size(0),
              "neptune::gat: col and eid must be [E] vectors of the same length");
  TORCH_CHECK(rowptr.scalar_type() == col.scalar_type() &&
                  eid.scalar_type() == col.scalar_type(),
              "neptune::gat: rowptr, col and eid must share one integer dtype");
  TORCH_CHECK(score_src.scalar_type() == h.scalar_type() &&
                  score_dst.scalar_type() == h.scalar_type(),
              "neptune::gat: h, score_src and score_dst must share one dtype");
  TORCH_CHECK(h.is_contiguous() && score_src.is_contiguous() &&
                  score_dst.is_contiguous() && rowptr.is_contiguous() &&
                  col.is_contiguous() && eid.is_contiguous(),
              "neptune::gat: inputs must be contiguous");
  if (edge_logits.has_value()) {
    const auto& el = *edge_logits;
    TORCH_CHECK(el.dim() == 2 && el.size(0) == col.size(0) && el.size(1) == H,
                "neptune::gat: edge_logits must be [E, H] = [", col.size(0), ", ", H,
                "], got ", el.sizes());
    TORCH_CHECK(el.scalar_type() == h.scalar_type() && el.is_contiguous(),
                "neptune::gat: edge_logits must be contiguous with the dtype of h");
  }
  TORCH_CHECK(dropout >= 0.0 && dropout < 1.0,
              "neptune::gat: dropout must be in [0, 1), got ", dropout);
  TORCH_CHECK(std::isfinite(negative_slope),
              "neptune::gat: negative_slope must be finite, got ", negative_slope);
}

// The dropout seed travels as an optional int64 scalar tensor on the CPU, so
// torch.compile can trace a fresh seed per step without recompiling.
inline uint64_t seed_value(const std::optional<at::Tensor>& seed, double dropout) {
  if (dropout <= 0.0) return 0;
  TORCH_CHECK(seed.has_value() && seed->numel() == 1 && seed->device().is_cpu() &&
                  seed->scalar_type() == at::kLong,
              "neptune::gat: dropout > 0 needs seed, a CPU int64 tensor with one element");
  return static_cast<uint64_t>(seed->data_ptr<int64_t>()[0]);
}

// Backward's saved tensors and incoming gradient, checked once for both back ends.
// out (and grad_out) have N_dst rows; with fewer_rows (the CPU kernel), at most N_dst:
// the rows past them get no gradient (gat_att's phantom row, gat_att.cpp).
inline void check_gat_backward_tensors(const at::Tensor& grad_out, const at::Tensor& out,
                                       const at::Tensor& lse, const at::Tensor& h,
                                       int64_t n_dst, bool fewer_rows = false) {
  const auto H = h.size(1), C = h.size(2);
  TORCH_CHECK(grad_out.sizes() == out.sizes() && grad_out.scalar_type() == h.scalar_type(),
              "neptune::gat_backward: grad_out must match out in shape and dtype");
  TORCH_CHECK(out.dim() == 3 && (fewer_rows ? out.size(0) <= n_dst : out.size(0) == n_dst) &&
                  out.size(1) == H && out.size(2) == C && out.scalar_type() == h.scalar_type(),
              "neptune::gat_backward: out must be [N_dst, H, C]", fewer_rows ? " (or fewer rows)" : "",
              " with the dtype of h, got ", out.sizes());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == n_dst && lse.size(1) == H &&
                  lse.scalar_type() == acc_dtype(h.scalar_type()),
              "neptune::gat_backward: lse must be [N_dst, H] in ", acc_dtype(h.scalar_type()),
              ", got ", lse.sizes(), " ", lse.scalar_type());
}

// Forward: (out [N_dst, H, C], lse [N_dst, H] in float32/float64).
std::tuple<at::Tensor, at::Tensor> gat_forward_cpu(
    const at::Tensor& h, const at::Tensor& score_src, const at::Tensor& score_dst,
    const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& eid,
    const at::Tensor& colptr, const at::Tensor& csc_row, const at::Tensor& csc_perm,
    const std::optional<at::Tensor>& edge_logits, double negative_slope,
    double dropout, const std::optional<at::Tensor>& seed);

// Backward: (grad_h, grad_score_src, grad_score_dst, grad_edge_logits).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gat_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& score_src,
    const at::Tensor& score_dst, const at::Tensor& rowptr, const at::Tensor& col,
    const at::Tensor& eid, const at::Tensor& colptr, const at::Tensor& csc_row,
    const at::Tensor& csc_perm, const std::optional<at::Tensor>& edge_logits,
    const at::Tensor& out, const at::Tensor& lse, double negative_slope,
    double dropout, const std::optional<at::Tensor>& seed);

// CUDA kernels (graph_attention_{fwd,bwd}_cuda.cu), same signatures and semantics as the
// CPU ones; declared unconditionally, defined only in CUDA builds.
std::tuple<at::Tensor, at::Tensor> gat_forward_cuda(
    const at::Tensor& h, const at::Tensor& score_src, const at::Tensor& score_dst,
    const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& eid,
    const at::Tensor& colptr, const at::Tensor& csc_row, const at::Tensor& csc_perm,
    const std::optional<at::Tensor>& edge_logits, double negative_slope,
    double dropout, const std::optional<at::Tensor>& seed);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gat_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& score_src,
    const at::Tensor& score_dst, const at::Tensor& rowptr, const at::Tensor& col,
    const at::Tensor& eid, const at::Tensor& colptr, const at::Tensor& csc_row,
    const at::Tensor& csc_perm, const std::optional<at::Tensor>& edge_logits,
    const at::Tensor& out, const at::Tensor& lse, double negative_slope,
    double dropout, const std::optional<at::Tensor>& seed);

// GAT with the logit halves <h, att_src>, <h, att_dst> computed inside (gat_att.cpp):
// sources and destinations are the same N nodes; rowptr may have more than N rows (the
// phantom row of removed self loops), whose outputs are dropped. Same calling convention
// as gat_forward/gat_backward with (h, att_src [H, C], att_dst [H, C]); out is [N, H, C],
// lse keeps every row. Composed from the kernels above: registered for CPU and CUDA.
std::tuple<at::Tensor, at::Tensor> gat_att_forward(
    const at::Tensor& h, const at::Tensor& att_src, const at::Tensor& att_dst,
    const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& eid,
    const at::Tensor& colptr, const at::Tensor& csc_row, const at::Tensor& csc_perm,
    const std::optional<at::Tensor>& edge_logits, double negative_slope, double dropout,
    const std::optional<at::Tensor>& seed);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gat_att_backward(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& att_src,
    const at::Tensor& att_dst, const at::Tensor& rowptr, const at::Tensor& col,
    const at::Tensor& eid, const at::Tensor& colptr, const at::Tensor& csc_row,
    const at::Tensor& csc_perm, const std::optional<at::Tensor>& edge_logits,
    const at::Tensor& out, const at::Tensor& lse, double negative_slope, double dropout,
    const std::optional<at::Tensor>& seed);

}  // namespace neptune
