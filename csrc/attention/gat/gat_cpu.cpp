// Fused sparse graph attention on the CPU.
//
// Forward, per destination i (one thread owns a destination, so there are no
// races and results do not depend on the thread count):
//   s_ij = LeakyReLU(score_src[j] + score_dst[i] (+ edge_logits[e]))
//   out_i = sum_j softmax_j(s_ij) * h[j]
// computed in one pass over the in-edges with an online softmax: nothing of size
// E x H x C or E x H is allocated. We save out and lse = max + log(sum).
//
// Backward, with D_i = <dOut_i, out_i> (per head) and a'_ij = dropped/scaled a_ij:
//   dS_ij = (a'_ij <dOut_i, h_j> - a_ij D_i) * LeakyReLU'(raw_ij)
//   pass 0 (destinations):       D_i (a sequential pass over dOut and out)
//   pass 1 (sources, CSC):       grad score_src_j = sum_i dS_ij,
//                                grad h_j = sum_i a'_ij dOut_i; stores dS per edge
//   pass 2 (destinations, CSR):  grad score_dst_i = sum_j dS_ij (no row gathers)
// so one row (dOut_i) is gathered per edge, not two.
// Each output element is written by exactly one thread in a fixed order: no
// atomics, bitwise deterministic.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "attention/gat/gat.h"
#include "attention/common/attention_cpu.h"
#include "attention/common/attention_math.h"

namespace neptune {
namespace {

// An edge's raw logits, every head (a vector loop): (score_dst[i] + score_src[j])
// (+ edge_logits[e]) in the accumulation type. Forward and backward both take them from
// here, so the backward's LeakyReLU sides and weights are the forward's.
template <typename acc_t, typename D, typename scalar_t>
inline void raw_logits(const D* sdi, const scalar_t* ssj, const scalar_t* ele, int64_t H, acc_t* raw) {
  if (ele) {
#pragma omp simd
    for (int64_t k = 0; k < H; ++k)
      raw[k] = static_cast<acc_t>(sdi[k]) + static_cast<acc_t>(ssj[k]) + static_cast<acc_t>(ele[k]);
  } else {
#pragma omp simd
    for (int64_t k = 0; k < H; ++k) raw[k] = static_cast<acc_t>(sdi[k]) + static_cast<acc_t>(ssj[k]);
  }
}

// GAT's logit and value for the shared forward pass (attention_cpu.h):
//   logit_ij = LeakyReLU(score_dst[i] + score_src[j] (+ edge_logits[e])), value_ij = h[j].
template <typename scalar_t, typename acc_t>
struct GatForward {
  const scalar_t* h;
  const scalar_t* ss;
  const scalar_t* sd;
  const scalar_t* el;
  int64_t H, C;
  acc_t slope;
  int64_t edge_cost = 1;
  static constexpr bool kLogitsFirst = true;  // a logit is H additions, no gather of h
  int64_t row_size() const { return H; }  // the row's scratch: score_dst[i]
  void begin_row(acc_t* base, int64_t i) const {
    for (int64_t k = 0; k < H; ++k) base[k] = static_cast<acc_t>(sd[i * H + k]);
  }
  void prefetch_logit(int64_t j, int64_t edge) const {
    __builtin_prefetch(ss + j * H, 0, 1);
    if (el) __builtin_prefetch(el + edge * H, 0, 1);
  }
  void prefetch(int64_t j, int64_t edge) const {
    prefetch_row(h + j * H * C, H * C);
    __builtin_prefetch(ss + j * H, 0, 1);
    if (el) __builtin_prefetch(el + edge * H, 0, 1);
  }
  void logits(const acc_t* base, int64_t j, int64_t edge, acc_t* x) const {
    raw_logits(base, ss + j * H, el ? el + edge * H : nullptr, H, x);
#pragma omp simd
    for (int64_t k = 0; k < H; ++k) x[k] = leaky_relu(x[k], slope);
  }
  void accumulate(acc_t* a, acc_t rescale, acc_t w, int64_t j, int64_t, int64_t k) const {
    axpy_rescaled<scalar_t, acc_t>(a, rescale, w, h + (j * H + k) * C, nullptr, C);
  }
};

template <typename scalar_t, typename index_t>
void backward_kernel(const BackwardCommon<scalar_t, index_t>& b, const at::Tensor& h_t,
                     const at::Tensor& ss_t, const at::Tensor& sd_t,
                     const std::optional<at::Tensor>& el_t, double slope_d, at::Tensor& gh_t,
                     at::Tensor& gss_t, at::Tensor& gsd_t, at::Tensor& gel_t, int64_t n_go) {
  using acc_t = at::opmath_type<scalar_t>;
  NEPTUNE_UNPACK_BACKWARD(b);
  const int64_t n_src = h_t.size(0), n_dst = sd_t.size(0), H = h_t.size(1),
                C = h_t.size(2), HC = H * C;
  const scalar_t* h = h_t.data_ptr<scalar_t>();
  const scalar_t* ss = ss_t.data_ptr<scalar_t>();
  const scalar_t* sd = sd_t.data_ptr<scalar_t>();
  const scalar_t* el = data_or_null<scalar_t>(el_t);
  scalar_t* gh = gh_t.data_ptr<scalar_t>();
  scalar_t* gss = gss_t.data_ptr<scalar_t>();
  scalar_t* gsd = gsd_t.data_ptr<scalar_t>();
  scalar_t* gel = el ? gel_t.data_ptr<scalar_t>() : nullptr;
  const acc_t slope = static_cast<acc_t>(slope_d);

  // Pass 0: D_i = <dOut_i, out_i> per head, for the rows that have a gradient (sequential).
  at::Tensor d_t = at::empty({n_go, H}, b.scratch);
  acc_t* Dv = d_t.data_ptr<acc_t>();
  parallel_for_isa(0, n_go, std::max<int64_t>(1, 4096 / std::max<int64_t>(HC, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) row_dots(go + i * HC, out + i * HC, H, C, Dv + i * H);
  });

  // Pass 1: sources, over the transposed graph. Source j's h_j and score_src_j stay in
  // cache; per in-edge only dOut_i is gathered (with a few values of i: score_dst, lse, D),
  // and it serves the weight, <dOut_i, h_j>, dS and grad h_j alike. dS is stored per edge
  // (CSR position) for pass 2.
  at::Tensor ds_t = empty_cpu({E, H}, b.scratch);
  acc_t* ds = ds_t.data_ptr<acc_t>();
  const bool need_edge = el != nullptr || drop.on;
  parallel_rows_by_cost(csc.colptr, n_src, HC, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(HC), g_ss(H), raw_v(H), a_v(H), g_v(H);
    acc_t* raws = raw_v.data();
    acc_t* as = a_v.data();
    acc_t* gs = g_v.data();
    for (int64_t j = begin; j < end; ++j) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(g_ss.begin(), g_ss.end(), acc_t(0));
      const scalar_t* hj = h + j * HC;
      for (int64_t t = csc.colptr[j]; t < csc.colptr[j + 1]; ++t) {
        if (t + kPrefetchDistance < E) {
          const int64_t in = csc.row[t + kPrefetchDistance];
          const int64_t en = csc.perm[t + kPrefetchDistance];
          if (in < n_go) {
            prefetch_row(go + in * HC, HC);
            __builtin_prefetch(Dv + in * H, 0, 1);
          }
          __builtin_prefetch(sd + in * H, 0, 1);
          __builtin_prefetch(lse + in * H, 0, 1);
          __builtin_prefetch(ds + en * H, 1, 1);  // written below: a random write per edge
          if (need_edge) __builtin_prefetch(csr.eid + en, 0, 1);
        }
        const int64_t i = csc.row[t];
        const int64_t e = csc.perm[t];
        const int64_t edge = need_edge ? static_cast<int64_t>(csr.eid[e]) : 0;
        if (i >= n_go) {  // a row without gradient (grad_out has n_go rows): nothing flows back
          for (int64_t k = 0; k < H; ++k) {
            ds[e * H + k] = 0;
            if (gel) gel[edge * H + k] = scalar_t(0);
          }
          continue;
        }
        const scalar_t* goi = go + i * HC;
        // the edge's raw logits and softmax weights, every head at once (vector loops)
        const acc_t* lsei = lse + i * H;
        raw_logits(sd + i * H, ss + j * H, el ? el + edge * H : nullptr, H, raws);
#pragma omp simd
        for (int64_t k = 0; k < H; ++k) as[k] = exp_acc(leaky_relu(raws[k], slope) - lsei[k]);
        head_dots<acc_t>(goi, hj, H, C, gs);  // <dOut_i, h_j> per head
        for (int64_t k = 0; k < H; ++k) {
          const acc_t raw = raws[k], a = as[k];
          const acc_t a_kept = drop.apply(a, edge, k);
          const acc_t gk = a_kept != acc_t(0) ? gs[k] : acc_t(0);
          const acc_t dS = logit_grad(a_kept, gk, a, Dv[i * H + k], raw, slope);
          g_ss[k] += dS;
          ds[e * H + k] = dS;
          if (gel) gel[edge * H + k] = static_cast<scalar_t>(dS);
          if (a_kept != acc_t(0))
            axpy_rescaled<scalar_t, acc_t>(acc.data() + k * C, acc_t(1), a_kept, goi + k * C, nullptr, C);
        }
      }
      for (int64_t x = 0; x < HC; ++x) gh[j * HC + x] = static_cast<scalar_t>(acc[x]);
      for (int64_t k = 0; k < H; ++k) gss[j * H + k] = static_cast<scalar_t>(g_ss[k]);
    }
  });

  // Pass 2: destinations: grad score_dst_i = sum_j dS_ij, read in CSR order (no gathers).
  parallel_rows_by_cost(csr.rowptr, n_dst, H, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> g_sd(H);
    for (int64_t i = begin; i < end; ++i) {
      std::fill(g_sd.begin(), g_sd.end(), acc_t(0));
      for (int64_t e = csr.rowptr[i]; e < csr.rowptr[i + 1]; ++e)
        for (int64_t k = 0; k < H; ++k) g_sd[k] += ds[e * H + k];
      for (int64_t k = 0; k < H; ++k) gsd[i * H + k] = static_cast<scalar_t>(g_sd[k]);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gat_forward_cpu(
    NEPTUNE_ATTENTION_FORWARD_PARAMS(h, score_src, score_dst, edge_logits, negative_slope)) {
  check_gat_inputs(h, score_src, score_dst, rowptr, col, eid, edge_logits, negative_slope, dropout);
  check_csr(rowptr, col, eid, h.size(0), score_dst.size(0), "neptune::gat_forward");
  const int64_t H = h.size(1), C = h.size(2);
  return attention_forward_cpu(h, {score_dst.size(0), H, C}, H, rowptr, col, eid, dropout, seed,
                               [&](auto* type) {
    using scalar_t = std::remove_pointer_t<decltype(type)>;
    using acc_t = at::opmath_type<scalar_t>;
    return GatForward<scalar_t, acc_t>{h.data_ptr<scalar_t>(), score_src.data_ptr<scalar_t>(),
                                       score_dst.data_ptr<scalar_t>(),
                                       data_or_null<scalar_t>(edge_logits), H, C,
                                       static_cast<acc_t>(negative_slope)};
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gat_backward_cpu(
    NEPTUNE_ATTENTION_BACKWARD_PARAMS(h, score_src, score_dst, edge_logits, negative_slope)) {
  check_gat_inputs(h, score_src, score_dst, rowptr, col, eid, edge_logits, negative_slope, dropout);
  check_csr(rowptr, col, eid, h.size(0), score_dst.size(0), "neptune::gat_backward");
  check_csc(rowptr, col, eid, colptr, csc_row, csc_perm, h.size(0), score_dst.size(0),
            "neptune::gat_backward");
  // grad_out and out may have fewer rows than the graph: the rows past them get no gradient
  check_attention_backward_tensors("neptune::gat_backward", grad_out, out, lse, h.scalar_type(),
                                   {score_dst.size(0), h.size(1), h.size(2)}, h.size(1),
                                   /*fewer_rows=*/true);
  const int64_t n_go = grad_out.size(0);
  at::Tensor gh = empty_cpu(h.sizes(), h.options());
  at::Tensor gss = at::empty_like(score_src);
  at::Tensor gsd = at::empty_like(score_dst);
  at::Tensor gel = edge_logits.has_value() ? empty_like_cpu(*edge_logits)
                                           : at::empty({0}, h.options());
  NEPTUNE_DISPATCH_FLOAT_AND_INDEX(h.scalar_type(), col.scalar_type(), "gat_backward_cpu", [&] {
    backward_kernel<scalar_t, index_t>(NEPTUNE_BACKWARD_COMMON, h, score_src, score_dst,
                                       edge_logits, negative_slope, gh, gss, gsd, gel, n_go);
  });
  return {gh, gss, gsd, gel};
}

// Whether the attention kernels' CPU loops take their AVX2 + FMA build here, now (the choice
// every loop makes: attention_cpu.h, cpu_avx2).
bool attention_cpu_avx2() { return cpu_avx2(); }

}  // namespace neptune
