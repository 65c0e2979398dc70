// Graph-transformer attention with its edge features projected inside, on the CPU
// (semantics and passes: transformer.h, "projected inside").
//
// The forward is the shared one (attention_cpu.h) with a variant whose row scratch holds
// q~_i = scale q_i and W_e^T q~_i, and whose head accumulator holds, beside sum_j w v_j,
// the D values sum_j w a_e that W_e turns into the edge part of the output once per row.
// The backward walks the destinations first (each edge's softmax weight, dS and the
// gradients of q and the edge attributes, with D-wide edge terms from the row's
// W_e^T q~_i and W_e^T dOut_i), then the sources over the transposed graph (the gradients
// of k and v from the stored dS and a'). One thread owns a row in every pass; grad W_e is
// summed per fixed block of destinations and then over the blocks in order. No atomics:
// bitwise the same for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "attention/common/attention_cpu.h"
#include "attention/common/attention_math.h"
#include "attention/transformer/transformer.h"

namespace neptune {
namespace {

// Destinations per block of the fixed-order grad W_e reduction.
constexpr int64_t kEdgeWeightBlock = 64;

template <typename scalar_t, typename acc_t>
struct TransformerEdgeForward {
  const scalar_t* q;   // [N_dst, H, C]
  const scalar_t* kv;  // [N_src, 2, H, C]
  const scalar_t* w;   // [H, C, D]
  const scalar_t* wt;  // the same, [H, D, C]
  const scalar_t* ea;  // [E, D] or nullptr
  int64_t H, C, D;
  acc_t scale;
  int64_t edge_cost = 2;
  int64_t HC() const { return H * C; }
  const scalar_t* k_row(int64_t j, int64_t h) const { return kv + (2 * j * H + h) * C; }
  const scalar_t* v_row(int64_t j, int64_t h) const { return kv + ((2 * j + 1) * H + h) * C; }
  const scalar_t* edge_row(int64_t edge) const { return ea + edge * D; }
  // The row's scratch: q~_i [H, C], then W_e^T q~_i [H, D].
  int64_t row_size() const { return H * C + H * D; }
  void begin_row(acc_t* r, int64_t i) const {
    load_scaled(r, q + i * H * C, scale, H * C);
    project_rows(r, r + H * C);
  }
  // out[h] = W_e[h]^T x[h] (D values per head) for x [H, C] in the accumulation type.
  void project_rows(const acc_t* x, acc_t* out) const {
    std::fill(out, out + H * D, acc_t(0));
    if (!ea) return;
    for (int64_t h = 0; h < H; ++h)
      for (int64_t c = 0; c < C; ++c) {
        const acc_t xc = x[h * C + c];
        const scalar_t* wr = w + (h * C + c) * D;
        acc_t* o = out + h * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] += xc * static_cast<acc_t>(wr[d]);
      }
  }
  void prefetch(int64_t j, int64_t edge) const {
    prefetch_row(kv + 2 * j * H * C, 2 * H * C);
    if (ea) __builtin_prefetch(ea + edge * D, 0, 1);
  }
  // The edge's logits of every head, <q~_i, k_j> (+ <W_e^T q~_i, a_e>), from the row's
  // scratch (forward and backward call this one function on the same operands, so that
  // a = exp(x - lse) is the forward's weight to the bit).
  void logits(acc_t* r, int64_t j, int64_t edge, acc_t* x) const {
    head_dots<acc_t>(r, kv + 2 * j * H * C, H, C, x);
    if (ea) edge_dots(r + H * C, edge, x);
  }
  // x[h] += <y[h], a_e> for y [H, D] (the edge part of a logit, or of g in backward).
  void edge_dots(const acc_t* y, int64_t edge, acc_t* x) const {
    const scalar_t* ae = edge_row(edge);
    for (int64_t h = 0; h < H; ++h) x[h] += dot_channels<acc_t>(y + h * D, ae, D);
  }
  // A head's accumulator: sum w v_j (C values), then sum w a_e (D values).
  int64_t acc_width() const { return C + D; }
  void accumulate(acc_t* a, acc_t rescale, acc_t wt, int64_t j, int64_t edge, int64_t h) const {
    axpy_rescaled<scalar_t, acc_t>(a, rescale, wt, v_row(j, h), nullptr, C);
    if (ea) axpy_rescaled<scalar_t, acc_t>(a + C, rescale, wt, edge_row(edge), nullptr, D);
  }
  // x[h] += W_e[h] y[h] (C values) for y [D].
  void unproject(acc_t* x, const acc_t* y, int64_t h) const {
    for (int64_t d = 0; d < D; ++d) {
      const acc_t yd = y[d];
      const scalar_t* wr = wt + (h * D + d) * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) x[c] += yd * static_cast<acc_t>(wr[c]);
    }
  }
  void finish(acc_t* a, int64_t h, acc_t inv, scalar_t* o) const {
    if (ea) unproject(a, a + C, h);
    for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(a[c] * inv);
  }
};

template <typename scalar_t, typename index_t>
void backward_kernel(const BackwardCommon<scalar_t, index_t>& b,
                     const TransformerEdgeForward<scalar_t, at::opmath_type<scalar_t>>& fwd,
                     int64_t n_src, int64_t n_dst, at::Tensor& gq_t, at::Tensor& gkv_t,
                     at::Tensor& gw_t, at::Tensor& gea_t) {
  using acc_t = at::opmath_type<scalar_t>;
  NEPTUNE_UNPACK_BACKWARD(b);
  const int64_t H = fwd.H, C = fwd.C, D = fwd.D, HC = H * C, HD = H * D;
  const scalar_t* q = fwd.q;
  const bool edges = fwd.ea != nullptr;
  const acc_t scale = fwd.scale;
  scalar_t* gq = gq_t.data_ptr<scalar_t>();
  scalar_t* gkv = gkv_t.data_ptr<scalar_t>();
  scalar_t* gea = edges ? gea_t.data_ptr<scalar_t>() : nullptr;
  (void)out;  // D_i is summed from the edges (below), not read off the output

  // Pass 1: destinations (CSR), one row per thread. With the forward's row scratch (q~_i,
  // W_e^T q~_i) and W_e^T dOut_i, a first walk over the row's edges gives each edge's a, a'
  // and a' g (g = <dOut_i, v_j + W_e a_e>; scratch at the edge's CSR position) and
  // D_i = sum_j a'_ij g_ij - the softmax backward's own sum of the same products, so a
  // row's dS cancel however large the logits (D = <dOut_i, out_i> would not: out sums
  // the same terms in another order). The weights a = exp(x - lse) carry lse's rounding
  // (eps |lse|, the same for every edge of a row): their sum A is 1 only to that rounding,
  // and with a large common key part (a key bias, logits of tens) grad q would pick up
  // k_common D (1 - A). So the softmax backward takes the weights normalized, a / A - then
  // a row's dS sum to 0 by construction - and D / A for D:
  //   dS_j = (a'g_j - a_j D / A) / A.
  // The same walk sums what grad q needs without dS (which needs the row's D and A): per
  // head, with kbar the key of the row's first edge of non-zero weight,
  //   sum_j dS_j k_j = (P - (D / A) Q) / A,   P = sum_j a'g (k_j - kbar),
  //   Q = sum_j a (k_j - kbar)
  // (the kbar sum_j dS_j part is 0: softmax ignores a common shift of the logits), so each
  // k_j is read once (a hub row's keys would otherwise be read a second time, from memory)
  // and the common key part never enters a difference. A second walk over the row reads
  // only its scratch and edge attributes: dS and a' / A (kept for pass 2),
  // u_i = sum_j dS a_e, t_i = sum_j a' a_e / A (for grad W_e) and grad edge_attr, each edge
  // written once.
  const int64_t S = 3 * H;  // per edge: a, a', a' g; then dS, a' for pass 2
  at::Tensor sc_t = empty_cpu({E, S}, b.scratch);
  acc_t* sc = sc_t.data_ptr<acc_t>();
  at::Tensor ut_t = empty_cpu({n_dst, 2 * HD}, b.scratch);
  acc_t* UT = ut_t.data_ptr<acc_t>();
  parallel_rows_by_cost(csr.rowptr, n_dst, 2 * HC, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(fwd.row_size()), goi(HC), op(HD), gqi(HC), Dh(H), gea_row(D), xv(H), g_v(H),
        P(HC), Q(HC), kbar(HC), A(H);
    std::vector<char> has_kbar(H);
    acc_t* xs = xv.data();
    acc_t* gs = g_v.data();
    for (int64_t i = begin; i < end; ++i) {
      fwd.begin_row(row.data(), i);
      const acc_t* qp = row.data() + HC;
      load_scaled(goi.data(), go + i * HC, acc_t(1), HC);
      fwd.project_rows(goi.data(), op.data());
      std::fill(Dh.begin(), Dh.end(), acc_t(0));
      std::fill(P.begin(), P.end(), acc_t(0));
      std::fill(Q.begin(), Q.end(), acc_t(0));
      std::fill(A.begin(), A.end(), acc_t(0));
      std::fill(has_kbar.begin(), has_kbar.end(), char(0));
      const int64_t e0 = csr.rowptr[i], e1 = csr.rowptr[i + 1];
      for (int64_t e = e0; e < e1; ++e) {
        if (e + kPrefetchDistance < E) fwd.prefetch(csr.col[e + kPrefetchDistance], csr.eid[e + kPrefetchDistance]);
        const int64_t j = csr.col[e], edge = csr.eid[e];
        acc_t* s = sc + e * S;
        // every head at once: the logits (the forward's function), the weights, and
        // g = <dOut_i, v_j> (+ <W_e^T dOut_i, a_e>)
        fwd.logits(row.data(), j, edge, xs);
        const acc_t* lsei = lse + i * H;
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) xs[h] = exp_acc(xs[h] - lsei[h]);
        head_dots<acc_t>(goi.data(), fwd.v_row(j, 0), H, C, gs);
        if (edges) fwd.edge_dots(op.data(), edge, gs);
        for (int64_t h = 0; h < H; ++h) {
          const acc_t a = xs[h];
          const acc_t a_kept = drop.apply(a, edge, h);
          const acc_t ag = a_kept != acc_t(0) ? a_kept * gs[h] : acc_t(0);
          s[h] = a;
          s[H + h] = a_kept;
          s[2 * H + h] = ag;
          Dh[h] += ag;
          if (a == acc_t(0)) continue;  // a masked edge (then a' g = 0 too): no 0 * inf
          const scalar_t* kh = fwd.k_row(j, h);
          acc_t* kb = kbar.data() + h * C;
          if (!has_kbar[h]) {
            for (int64_t c = 0; c < C; ++c) kb[c] = static_cast<acc_t>(kh[c]);
            has_kbar[h] = 1;
          }
          A[h] += a;
          acc_t* ph = P.data() + h * C;
          acc_t* qh = Q.data() + h * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const acc_t dk = static_cast<acc_t>(kh[c]) - kb[c];
            ph[c] += ag * dk;
            qh[c] += a * dk;
          }
        }
      }
      for (int64_t h = 0; h < H; ++h) {
        // 1 / A and D / A (0 for a row without weights: nothing flows back through it)
        const acc_t inv = A[h] != acc_t(0) ? acc_t(1) / A[h] : acc_t(0);
        Dh[h] *= inv;
        A[h] = inv;
        const acc_t dh = Dh[h];
        const acc_t* ph = P.data() + h * C;
        const acc_t* qh = Q.data() + h * C;
        acc_t* gh = gqi.data() + h * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) gh[c] = (ph[c] - dh * qh[c]) * inv;
      }
      acc_t* u = UT + i * 2 * HD;
      acc_t* tt = u + HD;
      std::fill(u, u + 2 * HD, acc_t(0));
      for (int64_t e = e0; e < e1; ++e) {
        if (edges && e + kPrefetchDistance < e1) {
          const int64_t en = csr.eid[e + kPrefetchDistance];
          __builtin_prefetch(gea + en * D, 1, 1);
          __builtin_prefetch(fwd.edge_row(en), 0, 1);
        }
        const int64_t edge = csr.eid[e];
        const scalar_t* ae = edges ? fwd.edge_row(edge) : nullptr;
        acc_t* s = sc + e * S;
        if (ae) std::fill(gea_row.begin(), gea_row.end(), acc_t(0));
        for (int64_t h = 0; h < H; ++h) {
          const acc_t a_kept = s[H + h] * A[h];  // (A[h] holds 1 / A, Dh[h] D / A now)
          const acc_t d = (s[2 * H + h] - s[h] * Dh[h]) * A[h];
          s[h] = d;  // pass 2 reads dS and a' / A
          s[H + h] = a_kept;
          if (!ae || (d == acc_t(0) && a_kept == acc_t(0))) continue;  // masked: no 0 * inf
          acc_t* uh = u + h * D;
          acc_t* th = tt + h * D;
          const acc_t* qph = qp + h * D;
          const acc_t* oph = op.data() + h * D;
#pragma omp simd
          for (int64_t dd = 0; dd < D; ++dd) {
            const acc_t x = static_cast<acc_t>(ae[dd]);
            uh[dd] += d * x;
            th[dd] += a_kept * x;
            gea_row[dd] += d * qph[dd] + a_kept * oph[dd];
          }
        }
        if (ae) {
          scalar_t* ge = gea + edge * D;
          for (int64_t dd = 0; dd < D; ++dd) ge[dd] = static_cast<scalar_t>(gea_row[dd]);
        }
      }
      if (edges)
        for (int64_t h = 0; h < H; ++h) fwd.unproject(gqi.data() + h * C, u + h * D, h);
      for (int64_t c = 0; c < HC; ++c) gq[i * HC + c] = static_cast<scalar_t>(gqi[c] * scale);
    }
  });

  // Pass 2: sources, over the transposed graph: grad k[j] = scale sum_i dS q_i and
  // grad v[j] = sum_i a' dOut_i (q_i and dOut_i gathered once per edge).
  parallel_rows_by_cost(csc.colptr, n_src, 2 * HC, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> akv(2 * HC);  // source j's grad k, then grad v: its row of grad kv
    for (int64_t j = begin; j < end; ++j) {
      std::fill(akv.begin(), akv.end(), acc_t(0));
      for (int64_t t = csc.colptr[j]; t < csc.colptr[j + 1]; ++t) {
        if (t + kPrefetchDistance < E) {
          const int64_t in = csc.row[t + kPrefetchDistance], en = csc.perm[t + kPrefetchDistance];
          prefetch_rows_of(in, HC, go, q);
          __builtin_prefetch(sc + en * S, 0, 1);
        }
        const int64_t i = csc.row[t], e = csc.perm[t];
        const acc_t* s = sc + e * S;
        for (int64_t h = 0; h < H; ++h) {
          const acc_t d = s[h], a_kept = s[H + h];
          if (d == acc_t(0) && a_kept == acc_t(0)) continue;
          const acc_t ds_scaled = d * scale;
          const scalar_t* qh = q + i * HC + h * C;
          const scalar_t* gh = go + i * HC + h * C;
          acc_t* akh = akv.data() + h * C;
          acc_t* avh = akh + HC;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            akh[c] += ds_scaled * static_cast<acc_t>(qh[c]);
            avh[c] += a_kept * static_cast<acc_t>(gh[c]);
          }
        }
      }
      scalar_t* gj = gkv + 2 * j * HC;
      for (int64_t c = 0; c < 2 * HC; ++c) gj[c] = static_cast<scalar_t>(akv[c]);
    }
  });

  // grad W_e[h][c][d] = sum_i scale q_i[h][c] u_i[h][d] + dOut_i[h][c] t_i[h][d]: per fixed
  // block of destinations, then over the blocks in order.
  const int64_t n_blocks = (n_dst + kEdgeWeightBlock - 1) / kEdgeWeightBlock;
  const int64_t HCD = HC * D;
  at::Tensor part_t = at::zeros({std::max<int64_t>(n_blocks, 1), HCD}, b.scratch);
  acc_t* part = part_t.data_ptr<acc_t>();
  if (edges && HCD > 0) {
    parallel_for_isa(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t blk = b0; blk < b1; ++blk) {
        acc_t* p = part + blk * HCD;
        const int64_t i_end = std::min(n_dst, (blk + 1) * kEdgeWeightBlock);
        for (int64_t i = blk * kEdgeWeightBlock; i < i_end; ++i) {
          const acc_t* u = UT + i * 2 * HD;
          const acc_t* tt = u + HD;
          for (int64_t h = 0; h < H; ++h)
            for (int64_t c = 0; c < C; ++c) {
              const acc_t qc = scale * static_cast<acc_t>(q[i * HC + h * C + c]);
              const acc_t gc = static_cast<acc_t>(go[i * HC + h * C + c]);
              acc_t* pr = p + (h * C + c) * D;
              const acc_t* uh = u + h * D;
              const acc_t* th = tt + h * D;
#pragma omp simd
              for (int64_t dd = 0; dd < D; ++dd) pr[dd] += qc * uh[dd] + gc * th[dd];
            }
        }
      }
    });
  }
  // The blocks in order, each entry summed over them from block 0 up (a pass over the
  // partial sums in memory order).
  scalar_t* gw = gw_t.data_ptr<scalar_t>();
  parallel_for_isa(0, HCD, 256, [&](int64_t x0, int64_t x1) {
    std::vector<acc_t> sum(x1 - x0, acc_t(0));
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const acc_t* pb = part + blk * HCD + x0;
#pragma omp simd
      for (int64_t x = 0; x < x1 - x0; ++x) sum[x] += pb[x];
    }
    for (int64_t x = x0; x < x1; ++x) gw[x] = static_cast<scalar_t>(sum[x - x0]);
  });
}

// wt: w [H, C, D] as [H, D, C] (contiguous), which the caller keeps alive.
template <typename scalar_t>
TransformerEdgeForward<scalar_t, at::opmath_type<scalar_t>> make_variant(
    const at::Tensor& q, const at::Tensor& kv, const at::Tensor& w, const at::Tensor& wt,
    const std::optional<at::Tensor>& edge_attr, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  return {q.data_ptr<scalar_t>(), kv.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
          wt.data_ptr<scalar_t>(), data_or_null<scalar_t>(edge_attr), q.size(1), q.size(2),
          w.size(2), static_cast<acc_t>(scale)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> transformer_edge_forward_cpu(
    NEPTUNE_ATTENTION_FORWARD_PARAMS(q, kv, w_edge, edge_attr, scale)) {
  check_transformer_edge_entry(q, kv, w_edge, rowptr, col, eid, edge_attr, scale, dropout,
                               "neptune::transformer_edge_forward");
  const at::Tensor wt = w_edge.transpose(1, 2).contiguous();
  return attention_forward_cpu(q, q.sizes(), q.size(1), rowptr, col, eid, dropout, seed,
                               [&](auto* type) {
                                 using scalar_t = std::remove_pointer_t<decltype(type)>;
                                 return make_variant<scalar_t>(q, kv, w_edge, wt, edge_attr, scale);
                               });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> transformer_edge_backward_cpu(
    NEPTUNE_ATTENTION_BACKWARD_PARAMS(q, kv, w_edge, edge_attr, scale)) {
  const char* op = "neptune::transformer_edge_backward";
  check_transformer_edge_entry(q, kv, w_edge, rowptr, col, eid, edge_attr, scale, dropout, op);
  check_csc(rowptr, col, eid, colptr, csc_row, csc_perm, kv.size(0), q.size(0), op);
  check_attention_backward_tensors(op, grad_out, out, lse, q.scalar_type(), q.sizes(), q.size(1));
  at::Tensor gq = empty_like_cpu(q);
  at::Tensor gkv = empty_like_cpu(kv);
  at::Tensor gw = at::empty_like(w_edge);
  const at::Tensor wt = w_edge.transpose(1, 2).contiguous();
  at::Tensor gea = edge_attr.has_value() ? empty_like_cpu(*edge_attr) : at::empty({0}, q.options());
  NEPTUNE_DISPATCH_FLOAT_AND_INDEX(q.scalar_type(), col.scalar_type(), "transformer_edge_backward_cpu", [&] {
    backward_kernel<scalar_t, index_t>(NEPTUNE_BACKWARD_COMMON,
                                       make_variant<scalar_t>(q, kv, w_edge, wt, edge_attr, scale),
                                       kv.size(0), q.size(0), gq, gkv, gw, gea);
  });
  return {gq, gkv, gw, gea};
}

}  // namespace neptune
