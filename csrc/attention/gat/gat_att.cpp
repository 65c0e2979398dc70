// GAT with its logit halves taken from the attention vectors (the GraphAttention layer's
// training step in one op call; semantics in gat.h):
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
#include <ATen/Parallel.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "attention/gat/gat.h"

namespace neptune {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// On the CPU the logit halves and their gradients are direct loops, parallel over fixed
// blocks of nodes (a chain of ATen calls costs more in dispatch than in arithmetic on small
// graphs, and its reductions over [N, H, C] run well below memory speed on large ones).
// Sums over nodes go block by block in a fixed order: results do not depend on the thread
// count. On other devices, ATen calls.
constexpr int64_t kBlock = 1024;  // nodes per block

// Both logit halves in one pass over h (CPU): ss [N, H] = <h[n], att_src>, sd [rows, H] =
// <h[n], att_dst> for the N nodes and zeros beyond. Forward and backward both call it, so
// the backward's halves are the forward's to the bit.
template <typename scalar_t>
void score_pair_cpu(const Tensor& h, const Tensor& att_src, const Tensor& att_dst, Tensor& ss,
                    Tensor& sd) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = h.size(0), H = h.size(1), C = h.size(2), rows = sd.size(0);
  const scalar_t* hp = h.const_data_ptr<scalar_t>();
  const scalar_t* as = att_src.const_data_ptr<scalar_t>();
  const scalar_t* ad = att_dst.const_data_ptr<scalar_t>();
  scalar_t* sp = ss.mutable_data_ptr<scalar_t>();
  scalar_t* dp = sd.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, N, kBlock, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t k = 0; k < H; ++k) {
        const scalar_t* hv = hp + (n * H + k) * C;
        const scalar_t* av = as + k * C;
        const scalar_t* dv = ad + k * C;
        acc_t a = 0, d = 0;
#pragma omp simd reduction(+ : a, d)
        for (int64_t c = 0; c < C; ++c) {
          const acc_t x = static_cast<acc_t>(hv[c]);
          a += x * static_cast<acc_t>(av[c]);
          d += x * static_cast<acc_t>(dv[c]);
        }
        sp[n * H + k] = static_cast<scalar_t>(a);
        dp[n * H + k] = static_cast<scalar_t>(d);
      }
  });
  for (int64_t x = N * H; x < rows * H; ++x) dp[x] = scalar_t(0);
}

// The logit halves: score_src [N, H] and score_dst [rows, H] (zeros for rows beyond N).
std::tuple<Tensor, Tensor> scores(const Tensor& h, const Tensor& att_src, const Tensor& att_dst,
                                  int64_t rows) {
  const int64_t N = h.size(0), H = h.size(1);
  if (!h.device().is_cpu()) {
    Tensor ss = at::sum(h * att_src.unsqueeze(0), {-1});
    Tensor sd = at::sum(h * att_dst.unsqueeze(0), {-1});
    if (rows > N) sd = at::cat({sd, at::zeros({rows - N, H}, sd.options())});
    return {ss, sd};
  }
  Tensor ss = at::empty({N, H}, h.options()), sd = at::empty({rows, H}, h.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "gat_att_scores",
                                  [&] { score_pair_cpu<scalar_t>(h, att_src, att_dst, ss, sd); });
  return {ss, sd};
}

// x [N, ...] with zero rows appended up to `rows` (for the CUDA kernel; the CPU one needs none).
Tensor pad_rows(const Tensor& x, int64_t rows) {
  if (rows == x.size(0)) return x;
  auto shape = x.sizes().vec();
  shape[0] = rows - x.size(0);
  return at::cat({x, at::zeros(shape, x.options())});
}

template <typename scalar_t>
void score_grads_cpu(Tensor& grad_h, const Tensor& h, const Tensor& gss, const Tensor& gsd,
                     const Tensor& att_src, const Tensor& att_dst, Tensor& ga_src, Tensor& ga_dst) {
  const int64_t N = h.size(0), H = h.size(1), C = h.size(2), HC = H * C;
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  using acc_t = at::opmath_type<scalar_t>;
  // The attention vectors' gradients sum over every node: in float64 (a float32 running sum
  // over a block of 1,024 nodes would lose digits against autograd's pairwise sums).
  using sum_t = double;
  const scalar_t* hp = h.const_data_ptr<scalar_t>();
  const scalar_t* gs = gss.const_data_ptr<scalar_t>();
  const scalar_t* gd = gsd.const_data_ptr<scalar_t>();
  const scalar_t* as = att_src.const_data_ptr<scalar_t>();
  const scalar_t* ad = att_dst.const_data_ptr<scalar_t>();
  scalar_t* gh = grad_h.mutable_data_ptr<scalar_t>();
  std::vector<sum_t> part(blocks * 2 * HC, sum_t(0));  // per block: sum for att_src, att_dst
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> a_s(HC), a_d(HC);
    for (int64_t x = 0; x < HC; ++x) a_s[x] = as[x], a_d[x] = ad[x];
    for (int64_t blk = b0; blk < b1; ++blk) {
      sum_t* ps = part.data() + blk * 2 * HC;
      sum_t* pd = ps + HC;
      for (int64_t n = blk * kBlock; n < std::min(N, (blk + 1) * kBlock); ++n)
        for (int64_t k = 0; k < H; ++k) {
          const acc_t s = gs[n * H + k], d = gd[n * H + k];
          scalar_t* g = gh + (n * H + k) * C;
          const scalar_t* hv = hp + (n * H + k) * C;
          const acc_t* vs = a_s.data() + k * C;
          const acc_t* vd = a_d.data() + k * C;
          sum_t* qs = ps + k * C;
          sum_t* qd = pd + k * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const acc_t hc = static_cast<acc_t>(hv[c]);
            g[c] = static_cast<scalar_t>(static_cast<acc_t>(g[c]) + s * vs[c] + d * vd[c]);
            qs[c] += static_cast<sum_t>(s) * hc;
            qd[c] += static_cast<sum_t>(d) * hc;
          }
        }
    }
  });
  scalar_t* os = ga_src.mutable_data_ptr<scalar_t>();
  scalar_t* od = ga_dst.mutable_data_ptr<scalar_t>();
  for (int64_t x = 0; x < HC; ++x) {
    sum_t s = 0, d = 0;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      s += part[blk * 2 * HC + x];
      d += part[blk * 2 * HC + HC + x];
    }
    os[x] = static_cast<scalar_t>(s);
    od[x] = static_cast<scalar_t>(d);
  }
}

// The logit halves' share of the gradients: grad_h += gss att_src + gsd att_dst (in place;
// grad_h is the kernel's fresh output), grad_att_src = sum_n gss[n] h[n], grad_att_dst
// likewise with gsd (gss, gsd: [N, H], the first N rows).
std::tuple<Tensor, Tensor> add_score_grads(Tensor& grad_h, const Tensor& h, const Tensor& gss,
                                           const Tensor& gsd, const Tensor& att_src,
                                           const Tensor& att_dst) {
  if (!h.device().is_cpu()) {
    grad_h.add_(gss.unsqueeze(-1) * att_src.unsqueeze(0)).add_(gsd.unsqueeze(-1) * att_dst.unsqueeze(0));
    return {at::sum(gss.unsqueeze(-1) * h, {0}), at::sum(gsd.unsqueeze(-1) * h, {0})};
  }
  const int64_t H = h.size(1), C = h.size(2);
  Tensor ga_src = at::empty({H, C}, h.options()), ga_dst = at::empty({H, C}, h.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "gat_att_grads", [&] {
    score_grads_cpu<scalar_t>(grad_h, h, gss, gsd, att_src, att_dst, ga_src, ga_dst);
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

std::tuple<Tensor, Tensor> gat_att_forward(
    NEPTUNE_ATTENTION_FORWARD_PARAMS(h, att_src, att_dst, edge_logits, negative_slope)) {
  check_gat_att(h, att_src, att_dst, rowptr, "neptune::gat_att_forward");
  const int64_t n = h.size(0), rows = rowptr.size(0) - 1;
  auto [ss, sd] = scores(h, att_src, att_dst, rows);
  auto [out, lse] = gat_forward_op().call(h, ss, sd, rowptr, col, eid, colptr, csc_row, csc_perm,
                                          edge_logits, negative_slope, dropout, seed);
  // lse keeps every row (backward needs the phantom row's); out only the N nodes' (the
  // first rows of the kernel's output: a contiguous view, no copy).
  return {rows == n ? out : out.narrow(0, 0, n), lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gat_att_backward(
    NEPTUNE_ATTENTION_BACKWARD_PARAMS(h, att_src, att_dst, edge_logits, negative_slope)) {
  check_gat_att(h, att_src, att_dst, rowptr, "neptune::gat_att_backward");
  const int64_t n = h.size(0), rows = rowptr.size(0) - 1;
  TORCH_CHECK(grad_out.sizes() == h.sizes() && out.sizes() == h.sizes(),
              "neptune::gat_att_backward: grad_out and out must be [N, H, C] like h, got ",
              grad_out.sizes(), " and ", out.sizes());
  // The phantom rows' outputs were dropped: they get no gradient. The CPU kernel takes
  // grad_out and out with fewer rows than the graph (the rows past them get none); the CUDA
  // kernel takes them padded with zeros (D = <0, out> = 0 there).
  const bool pad = !h.device().is_cpu();
  auto [ss, sd] = scores(h, att_src, att_dst, rows);
  auto [gh, gss, gsd, gel] = gat_backward_op().call(
      pad ? pad_rows(grad_out.contiguous(), rows) : grad_out, h, ss, sd, rowptr, col, eid, colptr, csc_row, csc_perm, edge_logits,
      pad ? pad_rows(out, rows) : out, lse, negative_slope, dropout, seed);
  // d<h, att>/dh = att, d<h, att>/datt = h.
  auto [grad_att_src, grad_att_dst] = add_score_grads(gh, h, gss, gsd.narrow(0, 0, n), att_src, att_dst);
  return {gh, grad_att_src, grad_att_dst, gel};
}

}  // namespace neptune
