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
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <cstring>
#include <tuple>
#include <vector>

#include "graph_attention.h"

namespace neptune {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Small inputs on the CPU take plain loops instead of a chain of ATen calls: there each
// ATen call's dispatch costs more than its arithmetic. Larger ones take ATen's (parallel)
// kernels. Both sum in a fixed order: the results do not depend on the thread count.
constexpr int64_t kSmall = 1 << 16;  // elements of h

bool small_cpu(const Tensor& h) { return h.device().is_cpu() && h.numel() <= kSmall; }

// The logit halves [rows, H]: <h[n], att> for the N nodes, zeros for rows beyond N.
Tensor scores(const Tensor& h, const Tensor& att, int64_t rows) {
  const int64_t N = h.size(0), H = h.size(1), C = h.size(2);
  if (!small_cpu(h)) {
    Tensor s = at::sum(h * att.unsqueeze(0), {-1});
    if (rows == N) return s;
    return at::cat({s, at::zeros({rows - N, H}, s.options())});
  }
  Tensor s = at::empty({rows, H}, h.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "gat_att_scores", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* ap = att.const_data_ptr<scalar_t>();
    scalar_t* sp = s.mutable_data_ptr<scalar_t>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < H; ++k) {
        acc_t acc = 0;
        for (int64_t c = 0; c < C; ++c)
          acc += static_cast<acc_t>(hp[(n * H + k) * C + c]) * static_cast<acc_t>(ap[k * C + c]);
        sp[n * H + k] = static_cast<scalar_t>(acc);
      }
    for (int64_t x = N * H; x < rows * H; ++x) sp[x] = scalar_t(0);
  });
  return s;
}

// x [N, ...] (contiguous) with zero rows appended up to `rows`.
Tensor pad_rows(const Tensor& x, int64_t rows) {
  if (rows == x.size(0)) return x;
  auto shape = x.sizes().vec();
  shape[0] = rows - x.size(0);
  if (!small_cpu(x)) return at::cat({x, at::zeros(shape, x.options())});
  shape[0] = rows;
  Tensor out = at::empty(shape, x.options());
  const int64_t bytes = x.numel() * x.element_size();
  std::memcpy(out.mutable_data_ptr(), x.const_data_ptr(), bytes);
  std::memset(static_cast<char*>(out.mutable_data_ptr()) + bytes, 0, out.numel() * out.element_size() - bytes);
  return out;
}

// The logit halves' share of the gradients: grad_h += gss att_src + gsd att_dst (in place;
// grad_h is the kernel's fresh output), grad_att_src = sum_n gss[n] h[n], grad_att_dst
// likewise with gsd (gss, gsd: [N, H], the first N rows).
std::tuple<Tensor, Tensor> add_score_grads(Tensor& grad_h, const Tensor& h, const Tensor& gss,
                                           const Tensor& gsd, const Tensor& att_src,
                                           const Tensor& att_dst) {
  if (!small_cpu(h)) {
    grad_h.add_(gss.unsqueeze(-1) * att_src.unsqueeze(0)).add_(gsd.unsqueeze(-1) * att_dst.unsqueeze(0));
    return {at::sum(gss.unsqueeze(-1) * h, {0}), at::sum(gsd.unsqueeze(-1) * h, {0})};
  }
  const int64_t N = h.size(0), H = h.size(1), C = h.size(2);
  Tensor ga_src = at::empty({H, C}, h.options()), ga_dst = at::empty({H, C}, h.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "gat_att_grads", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* gs = gss.const_data_ptr<scalar_t>();
    const scalar_t* gd = gsd.const_data_ptr<scalar_t>();
    const scalar_t* as = att_src.const_data_ptr<scalar_t>();
    const scalar_t* ad = att_dst.const_data_ptr<scalar_t>();
    scalar_t* gh = grad_h.mutable_data_ptr<scalar_t>();
    std::vector<acc_t> acc_s(H * C, acc_t(0)), acc_d(H * C, acc_t(0));
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < H; ++k) {
        const acc_t s = gs[n * H + k], d = gd[n * H + k];
        for (int64_t c = 0; c < C; ++c) {
          const int64_t x = (n * H + k) * C + c;
          gh[x] = static_cast<scalar_t>(static_cast<acc_t>(gh[x]) + s * static_cast<acc_t>(as[k * C + c]) +
                                        d * static_cast<acc_t>(ad[k * C + c]));
          acc_s[k * C + c] += s * static_cast<acc_t>(hp[x]);
          acc_d[k * C + c] += d * static_cast<acc_t>(hp[x]);
        }
      }
    scalar_t* os = ga_src.mutable_data_ptr<scalar_t>();
    scalar_t* od = ga_dst.mutable_data_ptr<scalar_t>();
    for (int64_t x = 0; x < H * C; ++x) {
      os[x] = static_cast<scalar_t>(acc_s[x]);
      od[x] = static_cast<scalar_t>(acc_d[x]);
    }
  });
  return {ga_src, ga_dst};
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
  TORCH_CHECK(h.is_contiguous() && att_src.is_contiguous() && att_dst.is_contiguous(), op,
              ": h, att_src and att_dst must be contiguous");
  TORCH_CHECK(att_src.device() == h.device() && att_dst.device() == h.device(), op,
              ": h, att_src and att_dst must be on one device");
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
  // d<h, att>/dh = att, d<h, att>/datt = h.
  auto [grad_att_src, grad_att_dst] = add_score_grads(gh, h, gss, gsd.narrow(0, 0, n), att_src, att_dst);
  return {gh, grad_att_src, grad_att_dst, gel};
}

}  // namespace neptune
