// GAT with its logit halves taken from the attention vectors (the GraphAttention layer's
// training step in one op call; semantics in graph_attention.h):
//
//   score_src[j] = <h[j], att_src>,  score_dst[i] = <h[i], att_dst>        (per head)
//   out = gat(h, score_src, score_dst, graph)[:N]
//
// for a graph whose sources and destinations are the same N nodes. The graph may have
// more destination rows than N (GATConv's self loops leave a phantom row that absorbs the
// removed loops): their logits get score_dst = 0 and their outputs are dropped, here and
// not in the layer. Composed in C++ from the GAT kernels (any device they run on) and a few
// ATen calls, so the layer's step is one op forward and one op backward.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <tuple>

#include "graph_attention.h"

namespace neptune {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// The logit halves [rows, H]: <h[n], att> for the N nodes, zeros for rows beyond N.
Tensor scores(const Tensor& h, const Tensor& att, int64_t rows) {
  Tensor s = at::sum(h * att.unsqueeze(0), {-1});
  if (rows == h.size(0)) return s;
  return at::cat({s, at::zeros({rows - h.size(0), h.size(1)}, s.options())});
}

// x [N, ...] with zero rows appended up to `rows`.
Tensor pad_rows(const Tensor& x, int64_t rows) {
  if (rows == x.size(0)) return x;
  auto shape = x.sizes().vec();
  shape[0] = rows - x.size(0);
  return at::cat({x, at::zeros(shape, x.options())});
}

void check_gat_att(const Tensor& h, const Tensor& att_src, const Tensor& att_dst,
                   const Tensor& rowptr, const char* op) {
  TORCH_CHECK(h.dim() == 3, op, ": h must be [N, H, C], got ", h.sizes());
  const auto H = h.size(1), C = h.size(2);
  TORCH_CHECK(att_src.dim() == 2 && att_src.size(0) == H && att_src.size(1) == C &&
                  att_dst.sizes() == att_src.sizes(),
              op, ": att_src and att_dst must be [H, C] = [", H, ", ", C, "], got ",
              att_src.sizes(), " and ", att_dst.sizes());
  TORCH_CHECK(att_src.scalar_type() == h.scalar_type() && att_dst.scalar_type() == h.scalar_type(),
              op, ": h, att_src and att_dst must share one dtype");
  TORCH_CHECK(rowptr.dim() == 1 && rowptr.size(0) >= h.size(0) + 1, op,
              ": rowptr must have at least N + 1 = ", h.size(0) + 1, " entries, got ",
              rowptr.sizes());
}

const c10::TypedOperatorHandle<decltype(gat_forward_cpu)>& gat_forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("neptune::gat_forward", "")
                             .typed<decltype(gat_forward_cpu)>();
  return op;
}

const c10::TypedOperatorHandle<decltype(gat_backward_cpu)>& gat_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("neptune::gat_backward", "")
                             .typed<decltype(gat_backward_cpu)>();
  return op;
}

}  // namespace

std::tuple<Tensor, Tensor> gat_att_forward(const Tensor& h, const Tensor& att_src,
                                           const Tensor& att_dst, const Tensor& rowptr,
                                           const Tensor& col, const Tensor& eid,
                                           const Tensor& colptr, const Tensor& csc_row,
                                           const Tensor& csc_perm, const OptTensor& edge_logits,
                                           double negative_slope, double dropout,
                                           const OptTensor& seed) {
  check_gat_att(h, att_src, att_dst, rowptr, "neptune::gat_att_forward");
  const int64_t n = h.size(0), rows = rowptr.size(0) - 1;
  auto [out, lse] = gat_forward_op().call(h, scores(h, att_src, n), scores(h, att_dst, rows),
                                          rowptr, col, eid, colptr, csc_row, csc_perm,
                                          edge_logits, negative_slope, dropout, seed);
  // lse keeps every row (backward needs the phantom row's); out only the N nodes'.
  return {rows == n ? out : out.narrow(0, 0, n).contiguous(), lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gat_att_backward(
    const Tensor& grad_out, const Tensor& h, const Tensor& att_src, const Tensor& att_dst,
    const Tensor& rowptr, const Tensor& col, const Tensor& eid, const Tensor& colptr,
    const Tensor& csc_row, const Tensor& csc_perm, const OptTensor& edge_logits, const Tensor& out,
    const Tensor& lse, double negative_slope, double dropout, const OptTensor& seed) {
  check_gat_att(h, att_src, att_dst, rowptr, "neptune::gat_att_backward");
  const int64_t n = h.size(0), rows = rowptr.size(0) - 1;
  TORCH_CHECK(grad_out.sizes() == h.sizes() && out.sizes() == h.sizes(),
              "neptune::gat_att_backward: grad_out and out must be [N, H, C] like h, got ",
              grad_out.sizes(), " and ", out.sizes());
  // The phantom rows' outputs were dropped: zero gradient, and D = <0, out> = 0 there.
  auto [gh, gss, gsd, gel] = gat_backward_op().call(
      pad_rows(grad_out.contiguous(), rows), h, scores(h, att_src, n), scores(h, att_dst, rows),
      rowptr, col, eid, colptr, csc_row, csc_perm, edge_logits, pad_rows(out, rows), lse,
      negative_slope, dropout, seed);
  const Tensor gsd_n = gsd.narrow(0, 0, n);
  // d<h, att>/dh = att, d<h, att>/datt = h.
  Tensor grad_h = gh + gss.unsqueeze(-1) * att_src.unsqueeze(0) + gsd_n.unsqueeze(-1) * att_dst.unsqueeze(0);
  Tensor grad_att_src = at::sum(gss.unsqueeze(-1) * h, {0});
  Tensor grad_att_dst = at::sum(gsd_n.unsqueeze(-1) * h, {0});
  return {grad_h, grad_att_src, grad_att_dst, gel};
}

}  // namespace neptune
