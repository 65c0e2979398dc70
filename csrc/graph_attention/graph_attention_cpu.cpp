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
//   pass 1 (destinations, CSR):  grad score_dst_i = sum_j dS_ij; stores dS, a'
//   pass 2 (sources, CSC):       grad score_src_j = sum_i dS_ij,
//                                grad h_j = sum_i a'_ij dOut_i
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

#include "graph_attention.h"
#include "cpu_gather.h"
#include "graph_attention_math.h"

namespace neptune {
namespace {

template <typename scalar_t, typename index_t>
void forward_kernel(const at::Tensor& h_t, const at::Tensor& ss_t, const at::Tensor& sd_t,
                    const at::Tensor& rowptr_t, const at::Tensor& col_t,
                    const at::Tensor& eid_t, const std::optional<at::Tensor>& el_t,
                    at::Tensor& out_t, at::Tensor& lse_t, double slope_d, double p_d,
                    uint64_t seed) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n_dst = sd_t.size(0), H = h_t.size(1), C = h_t.size(2), HC = H * C;
  const int64_t n_edges = col_t.size(0);
  const scalar_t* h = h_t.data_ptr<scalar_t>();
  const scalar_t* ss = ss_t.data_ptr<scalar_t>();
  const scalar_t* sd = sd_t.data_ptr<scalar_t>();
  const scalar_t* el = el_t.has_value() ? el_t->data_ptr<scalar_t>() : nullptr;
  const index_t* rowptr = rowptr_t.data_ptr<index_t>();
  const index_t* col = col_t.data_ptr<index_t>();
  const index_t* eid = eid_t.data_ptr<index_t>();
  scalar_t* out = out_t.data_ptr<scalar_t>();
  acc_t* lse = lse_t.data_ptr<acc_t>();
  const acc_t slope = static_cast<acc_t>(slope_d);
  const bool use_dropout = p_d > 0.0;
  const float p = static_cast<float>(p_d);
  const acc_t keep_scale = dropout_keep_scale<acc_t>(p_d);

  at::parallel_for(0, n_dst, grain_for(n_dst, col_t.size(0), HC), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(HC), m(H), s(H), base(H);
    for (int64_t i = begin; i < end; ++i) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(s.begin(), s.end(), acc_t(0));
      for (int64_t k = 0; k < H; ++k) base[k] = static_cast<acc_t>(sd[i * H + k]);
      const int64_t e_end = rowptr[i + 1];
      for (int64_t e = rowptr[i]; e < e_end; ++e) {
        if (e + kPrefetchDistance < n_edges) {
          const int64_t jn = col[e + kPrefetchDistance];
          prefetch_row(h + jn * HC, HC);
          __builtin_prefetch(ss + jn * H, 0, 1);
          if (el) __builtin_prefetch(el + static_cast<int64_t>(eid[e + kPrefetchDistance]) * H, 0, 1);
        }
        const int64_t j = col[e];
        const int64_t edge = eid[e];
        const scalar_t* hj = h + j * HC;
        for (int64_t k = 0; k < H; ++k) {
          acc_t raw = base[k] + static_cast<acc_t>(ss[j * H + k]);
          if (el) raw += static_cast<acc_t>(el[edge * H + k]);
          const acc_t x = leaky_relu(raw, slope);
          acc_t rescale, w;
          online_softmax_step(x, m[k], s[k], rescale, w);
          if (use_dropout) w = dropout_keep(seed, edge, k, p) ? w * keep_scale : acc_t(0);
          acc_t* a = acc.data() + k * C;
          const scalar_t* hv = hj + k * C;
          if (rescale != acc_t(1)) {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) a[c] = a[c] * rescale + w * static_cast<acc_t>(hv[c]);
          } else {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) a[c] += w * static_cast<acc_t>(hv[c]);
          }
        }
      }
      for (int64_t k = 0; k < H; ++k) {
        const bool any = softmax_has_mass(s[k]);
        const acc_t inv = any ? acc_t(1) / s[k] : acc_t(0);
        lse[i * H + k] = any ? m[k] + std::log(s[k]) : acc_t(0);
        scalar_t* o = out + i * HC + k * C;
        const acc_t* a = acc.data() + k * C;
        for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(a[c] * inv);
      }
    }
  });
}

template <typename scalar_t, typename index_t>
void backward_kernel(const at::Tensor& go_t, const at::Tensor& h_t, const at::Tensor& ss_t,
                     const at::Tensor& sd_t, const at::Tensor& rowptr_t,
                     const at::Tensor& col_t, const at::Tensor& eid_t,
                     const at::Tensor& colptr_t, const at::Tensor& csc_row_t,
                     const at::Tensor& csc_perm_t, const std::optional<at::Tensor>& el_t,
                     const at::Tensor& out_t, const at::Tensor& lse_t, double slope_d,
                     double p_d, uint64_t seed, at::Tensor& gh_t, at::Tensor& gss_t,
                     at::Tensor& gsd_t, at::Tensor& gel_t, int64_t n_go) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n_src = h_t.size(0), n_dst = sd_t.size(0), H = h_t.size(1),
                C = h_t.size(2), HC = H * C, E = col_t.size(0);
  const scalar_t* go = go_t.data_ptr<scalar_t>();
  const scalar_t* h = h_t.data_ptr<scalar_t>();
  const scalar_t* ss = ss_t.data_ptr<scalar_t>();
  const scalar_t* sd = sd_t.data_ptr<scalar_t>();
  const scalar_t* el = el_t.has_value() ? el_t->data_ptr<scalar_t>() : nullptr;
  const scalar_t* out = out_t.data_ptr<scalar_t>();
  const acc_t* lse = lse_t.data_ptr<acc_t>();
  const index_t* rowptr = rowptr_t.data_ptr<index_t>();
  const index_t* col = col_t.data_ptr<index_t>();
  const index_t* eid = eid_t.data_ptr<index_t>();
  const index_t* colptr = colptr_t.data_ptr<index_t>();
  const index_t* csc_row = csc_row_t.data_ptr<index_t>();
  const index_t* csc_perm = csc_perm_t.data_ptr<index_t>();
  scalar_t* gh = gh_t.data_ptr<scalar_t>();
  scalar_t* gss = gss_t.data_ptr<scalar_t>();
  scalar_t* gsd = gsd_t.data_ptr<scalar_t>();
  scalar_t* gel = el ? gel_t.data_ptr<scalar_t>() : nullptr;
  const acc_t slope = static_cast<acc_t>(slope_d);
  const bool use_dropout = p_d > 0.0;
  const float p = static_cast<float>(p_d);
  const acc_t keep_scale = dropout_keep_scale<acc_t>(p_d);

  // Per-edge dS and a' in CSR order: E x H scratch (backward only).
  at::Tensor ds_t = at::empty({E, H}, lse_t.options());
  at::Tensor ap_t = at::empty({E, H}, lse_t.options());
  acc_t* ds = ds_t.data_ptr<acc_t>();
  acc_t* ap = ap_t.data_ptr<acc_t>();

  // Pass 1: destinations.
  at::parallel_for(0, n_dst, grain_for(n_dst, E, HC), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> D(H), g_sd(H), base(H);
    for (int64_t i = begin; i < end; ++i) {
      if (i >= n_go) {  // a row without gradient (grad_out has n_go rows): nothing flows back
        for (int64_t e = rowptr[i]; e < rowptr[i + 1]; ++e)
          for (int64_t k = 0; k < H; ++k) {
            ds[e * H + k] = 0;
            ap[e * H + k] = 0;
            if (gel) gel[eid[e] * H + k] = scalar_t(0);
          }
        for (int64_t k = 0; k < H; ++k) gsd[i * H + k] = scalar_t(0);
        continue;
      }
      const scalar_t* goi = go + i * HC;
      const scalar_t* oi = out + i * HC;
      for (int64_t k = 0; k < H; ++k) {
        acc_t d = 0;
        for (int64_t c = 0; c < C; ++c)
          d += static_cast<acc_t>(goi[k * C + c]) * static_cast<acc_t>(oi[k * C + c]);
        D[k] = d;
        g_sd[k] = 0;
        base[k] = static_cast<acc_t>(sd[i * H + k]);
      }
      for (int64_t e = rowptr[i]; e < rowptr[i + 1]; ++e) {
        if (e + kPrefetchDistance < E) {
          const int64_t jn = col[e + kPrefetchDistance];
          prefetch_row(h + jn * HC, HC);
          __builtin_prefetch(ss + jn * H, 0, 1);
          if (el) {
            const int64_t en = eid[e + kPrefetchDistance];
            __builtin_prefetch(el + en * H, 0, 1);
            __builtin_prefetch(gel + en * H, 1, 1);
          }
        }
        const int64_t j = col[e];
        const int64_t edge = eid[e];
        const scalar_t* hj = h + j * HC;
        for (int64_t k = 0; k < H; ++k) {
          acc_t raw = base[k] + static_cast<acc_t>(ss[j * H + k]);
          if (el) raw += static_cast<acc_t>(el[edge * H + k]);
          const acc_t a = std::exp(leaky_relu(raw, slope) - lse[i * H + k]);
          acc_t a_kept = a;
          if (use_dropout) a_kept = dropout_keep(seed, edge, k, p) ? a * keep_scale : acc_t(0);
          acc_t g = 0;
          if (a_kept != acc_t(0)) {
            const scalar_t* hv = hj + k * C;
            const scalar_t* gv = goi + k * C;
#pragma omp simd reduction(+ : g)
            for (int64_t c = 0; c < C; ++c) g += static_cast<acc_t>(gv[c]) * static_cast<acc_t>(hv[c]);
          }
          const acc_t dS = logit_grad(a_kept, g, a, D[k], raw, slope);
          g_sd[k] += dS;
          ds[e * H + k] = dS;
          ap[e * H + k] = a_kept;
          if (gel) gel[edge * H + k] = static_cast<scalar_t>(dS);
        }
      }
      for (int64_t k = 0; k < H; ++k) gsd[i * H + k] = static_cast<scalar_t>(g_sd[k]);
    }
  });

  // Pass 2: sources, over the transposed graph.
  at::parallel_for(0, n_src, grain_for(n_src, E, HC), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(HC), g_ss(H);
    for (int64_t j = begin; j < end; ++j) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(g_ss.begin(), g_ss.end(), acc_t(0));
      for (int64_t t = colptr[j]; t < colptr[j + 1]; ++t) {
        if (t + kPrefetchDistance < E) {
          const int64_t in = csc_row[t + kPrefetchDistance];
          const int64_t en = csc_perm[t + kPrefetchDistance];
          prefetch_row(go + in * HC, HC);
          __builtin_prefetch(ds + en * H, 0, 1);
          __builtin_prefetch(ap + en * H, 0, 1);
        }
        const int64_t i = csc_row[t];
        const int64_t e = csc_perm[t];
        const scalar_t* goi = go + i * HC;
        for (int64_t k = 0; k < H; ++k) {
          g_ss[k] += ds[e * H + k];
          const acc_t w = ap[e * H + k];
          if (w == acc_t(0)) continue;
          acc_t* a = acc.data() + k * C;
          const scalar_t* gv = goi + k * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) a[c] += w * static_cast<acc_t>(gv[c]);
        }
      }
      for (int64_t x = 0; x < HC; ++x) gh[j * HC + x] = static_cast<scalar_t>(acc[x]);
      for (int64_t k = 0; k < H; ++k) gss[j * H + k] = static_cast<scalar_t>(g_ss[k]);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gat_forward_cpu(
    const at::Tensor& h, const at::Tensor& score_src, const at::Tensor& score_dst,
    const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& eid,
    const at::Tensor& colptr, const at::Tensor& csc_row, const at::Tensor& csc_perm,
    const std::optional<at::Tensor>& edge_logits, double negative_slope, double dropout,
    const std::optional<at::Tensor>& seed) {
  check_gat_inputs(h, score_src, score_dst, rowptr, col, eid, edge_logits, negative_slope, dropout);
  check_csr(rowptr, col, eid, h.size(0), score_dst.size(0), "neptune::gat_forward");
  const int64_t n_dst = score_dst.size(0), H = h.size(1), C = h.size(2);
  at::Tensor out = at::empty({n_dst, H, C}, h.options());
  at::Tensor lse = at::empty({n_dst, H}, h.options().dtype(acc_dtype(h.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "gat_forward_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(col.scalar_type(), "gat_forward_cpu_index", [&] {
      forward_kernel<scalar_t, index_t>(h, score_src, score_dst, rowptr, col, eid, edge_logits,
                                        out, lse, negative_slope, dropout,
                                        seed_value(seed, dropout));
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gat_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& score_src,
    const at::Tensor& score_dst, const at::Tensor& rowptr, const at::Tensor& col,
    const at::Tensor& eid, const at::Tensor& colptr, const at::Tensor& csc_row,
    const at::Tensor& csc_perm, const std::optional<at::Tensor>& edge_logits,
    const at::Tensor& out, const at::Tensor& lse, double negative_slope, double dropout,
    const std::optional<at::Tensor>& seed) {
  check_gat_inputs(h, score_src, score_dst, rowptr, col, eid, edge_logits, negative_slope, dropout);
  check_csr(rowptr, col, eid, h.size(0), score_dst.size(0), "neptune::gat_backward");
  check_csc(rowptr, col, eid, colptr, csc_row, csc_perm, h.size(0), score_dst.size(0),
            "neptune::gat_backward");
  // grad_out and out may have fewer rows than the graph: the rows past them get no gradient
  check_gat_backward_tensors(grad_out, out, lse, h, score_dst.size(0), /*fewer_rows=*/true);
  const int64_t n_go = grad_out.size(0);
  const at::Tensor go = grad_out.contiguous();
  at::Tensor gh = at::empty_like(h);
  at::Tensor gss = at::empty_like(score_src);
  at::Tensor gsd = at::empty_like(score_dst);
  at::Tensor gel = edge_logits.has_value() ? at::empty_like(*edge_logits)
                                           : at::empty({0}, h.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "gat_backward_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(col.scalar_type(), "gat_backward_cpu_index", [&] {
      backward_kernel<scalar_t, index_t>(go, h, score_src, score_dst, rowptr, col, eid, colptr,
                                         csc_row, csc_perm, edge_logits, out.contiguous(),
                                         lse.contiguous(), negative_slope, dropout,
                                         seed_value(seed, dropout), gh, gss, gsd, gel, n_go);
    });
  });
  return {gh, gss, gsd, gel};
}

}  // namespace neptune
