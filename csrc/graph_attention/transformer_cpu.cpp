// Fused graph-transformer attention on the CPU (semantics and passes: transformer.h).
//
// One thread owns a destination in forward and backward pass 2, and a source in
// pass 1, the rows split among the threads at equal cost (edges + rows: a hub does not
// stall one thread); no atomics, so results are bitwise the same for any thread count. The inner
// loops over the C channels of a head are `omp simd` loops (the reductions' order is
// fixed by the code, not by the run).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_gather.h"
#include "graph_attention.h"  // seed_value
#include "graph_attention_math.h"
#include "transformer.h"

namespace neptune {
namespace {

// <a, b (+ e)> over C channels, a already in the accumulation type; without a: <b, e>.
template <typename scalar_t, typename acc_t>
inline acc_t dot_keyed(const acc_t* a, const scalar_t* b, const scalar_t* e, int64_t C) {
  acc_t s = 0;
  if (!a) {
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < C; ++c) s += static_cast<acc_t>(b[c]) * static_cast<acc_t>(e[c]);
  } else if (e) {
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < C; ++c)
      s += a[c] * (static_cast<acc_t>(b[c]) + static_cast<acc_t>(e[c]));
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < C; ++c) s += a[c] * static_cast<acc_t>(b[c]);
  }
  return s;
}

// acc = acc * rescale + w * (v (+ e)).
template <typename scalar_t, typename acc_t>
inline void axpy_rescaled(acc_t* acc, acc_t rescale, acc_t w, const scalar_t* v, const scalar_t* e,
                          int64_t C) {
  if (e) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c)
      acc[c] = acc[c] * rescale + w * (static_cast<acc_t>(v[c]) + static_cast<acc_t>(e[c]));
  } else if (rescale != acc_t(1)) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) acc[c] = acc[c] * rescale + w * static_cast<acc_t>(v[c]);
  } else {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) acc[c] += w * static_cast<acc_t>(v[c]);
  }
}

template <typename scalar_t, typename acc_t>
inline void load_scaled(acc_t* dst, const scalar_t* src, acc_t scale, int64_t n) {
  for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<acc_t>(src[c]) * scale;
}

template <typename scalar_t, typename index_t>
void forward_kernel(const at::Tensor& q_t, const at::Tensor& k_t, const at::Tensor& v_t,
                    const at::Tensor& rowptr_t, const at::Tensor& col_t, const at::Tensor& eid_t,
                    const std::optional<at::Tensor>& ef_t, at::Tensor& out_t, at::Tensor& lse_t,
                    double scale_d, double p_d, uint64_t seed) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n_dst = q_t.size(0), H = q_t.size(1), C = q_t.size(2), HC = H * C;
  const int64_t E = col_t.size(0);
  const scalar_t* q = q_t.data_ptr<scalar_t>();
  const scalar_t* k = k_t.data_ptr<scalar_t>();
  const scalar_t* v = v_t.data_ptr<scalar_t>();
  const scalar_t* ef = ef_t.has_value() ? ef_t->data_ptr<scalar_t>() : nullptr;
  const index_t* rowptr = rowptr_t.data_ptr<index_t>();
  const index_t* col = col_t.data_ptr<index_t>();
  const index_t* eid = eid_t.data_ptr<index_t>();
  scalar_t* out = out_t.data_ptr<scalar_t>();
  acc_t* lse = lse_t.data_ptr<acc_t>();
  const acc_t scale = static_cast<acc_t>(scale_d);
  const bool use_dropout = p_d > 0.0;
  const float p = static_cast<float>(p_d);
  const acc_t keep_scale = dropout_keep_scale<acc_t>(p_d);

  parallel_rows_by_cost(rowptr, n_dst, 2 * HC, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(HC), qi(HC), m(H), s(H);
    for (int64_t i = begin; i < end; ++i) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(s.begin(), s.end(), acc_t(0));
      load_scaled(qi.data(), q + i * HC, scale, HC);
      const int64_t e_end = rowptr[i + 1];
      for (int64_t e = rowptr[i]; e < e_end; ++e) {
        if (e + kPrefetchDistance < E) {
          const int64_t jn = col[e + kPrefetchDistance];
          prefetch_row(k + jn * HC, HC);
          prefetch_row(v + jn * HC, HC);
          if (ef) prefetch_row(ef + static_cast<int64_t>(eid[e + kPrefetchDistance]) * HC, HC);
        }
        const int64_t j = col[e], edge = eid[e];
        const scalar_t* efe = ef ? ef + edge * HC : nullptr;
        for (int64_t h = 0; h < H; ++h) {
          const int64_t o = h * C;
          const acc_t x = dot_keyed<scalar_t, acc_t>(qi.data() + o, k + j * HC + o,
                                                     efe ? efe + o : nullptr, C);
          acc_t rescale, w;
          online_softmax_step(x, m[h], s[h], rescale, w);
          if (use_dropout) w = dropout_keep(seed, edge, h, p) ? w * keep_scale : acc_t(0);
          axpy_rescaled<scalar_t, acc_t>(acc.data() + o, rescale, w, v + j * HC + o,
                                         efe ? efe + o : nullptr, C);
        }
      }
      for (int64_t h = 0; h < H; ++h) {
        const bool any = softmax_has_mass(s[h]);
        const acc_t inv = any ? acc_t(1) / s[h] : acc_t(0);
        lse[i * H + h] = any ? m[h] + std::log(s[h]) : acc_t(0);
        scalar_t* o = out + i * HC + h * C;
        const acc_t* a = acc.data() + h * C;
        for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(a[c] * inv);
      }
    }
  });
}

template <typename scalar_t, typename index_t>
void backward_kernel(const at::Tensor& go_t, const at::Tensor& q_t, const at::Tensor& k_t,
                     const at::Tensor& v_t, const at::Tensor& rowptr_t, const at::Tensor& col_t,
                     const at::Tensor& eid_t, const at::Tensor& colptr_t,
                     const at::Tensor& csc_row_t, const at::Tensor& csc_perm_t,
                     const std::optional<at::Tensor>& ef_t, const at::Tensor& out_t,
                     const at::Tensor& lse_t, double scale_d, double p_d, uint64_t seed,
                     at::Tensor& gq_t, at::Tensor& gk_t, at::Tensor& gv_t, at::Tensor& gef_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n_src = k_t.size(0), n_dst = q_t.size(0), H = q_t.size(1), C = q_t.size(2),
                HC = H * C, E = col_t.size(0);
  const scalar_t* go = go_t.data_ptr<scalar_t>();
  const scalar_t* q = q_t.data_ptr<scalar_t>();
  const scalar_t* k = k_t.data_ptr<scalar_t>();
  const scalar_t* v = v_t.data_ptr<scalar_t>();
  const scalar_t* ef = ef_t.has_value() ? ef_t->data_ptr<scalar_t>() : nullptr;
  const scalar_t* out = out_t.data_ptr<scalar_t>();
  const acc_t* lse = lse_t.data_ptr<acc_t>();
  const index_t* rowptr = rowptr_t.data_ptr<index_t>();
  const index_t* col = col_t.data_ptr<index_t>();
  const index_t* eid = eid_t.data_ptr<index_t>();
  const index_t* colptr = colptr_t.data_ptr<index_t>();
  const index_t* csc_row = csc_row_t.data_ptr<index_t>();
  const index_t* csc_perm = csc_perm_t.data_ptr<index_t>();
  scalar_t* gq = gq_t.data_ptr<scalar_t>();
  scalar_t* gk = gk_t.data_ptr<scalar_t>();
  scalar_t* gv = gv_t.data_ptr<scalar_t>();
  scalar_t* gef = ef ? gef_t.data_ptr<scalar_t>() : nullptr;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const bool use_dropout = p_d > 0.0;
  const float p = static_cast<float>(p_d);
  const acc_t keep_scale = dropout_keep_scale<acc_t>(p_d);

  // D_i = sum_j a'_ij g_ij = <dOut_i, out_i> per head. With float32/float64 inputs `out`
  // holds the accumulated sum to its last bit and the dot product is used. A bfloat16 or
  // float16 `out` is rounded to 8 or 11 bits: the softmax gradients of a row would then no
  // longer sum to 0, and grad q would pick up that residue times the keys' common part (a key
  // bias, say) - so D is summed from the edges again, in the accumulation type (one more
  // gather of k_j and v_j per edge, at half width).
  at::Tensor d_t = at::empty({n_dst, H}, lse_t.options());
  acc_t* Dv = d_t.data_ptr<acc_t>();
  constexpr bool kExactD = !std::is_same_v<scalar_t, acc_t>;
  parallel_rows_by_cost(rowptr, n_dst, kExactD ? 2 * HC : HC, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> goi(HC), qi(HC);
    for (int64_t i = begin; i < end; ++i) {
      load_scaled(goi.data(), go + i * HC, acc_t(1), HC);
      if constexpr (!kExactD) {
        for (int64_t h = 0; h < H; ++h)
          Dv[i * H + h] = dot_keyed<scalar_t, acc_t>(goi.data() + h * C, out + i * HC + h * C, nullptr, C);
        continue;
      }
      load_scaled(qi.data(), q + i * HC, scale, HC);
      for (int64_t h = 0; h < H; ++h) Dv[i * H + h] = 0;
      for (int64_t e = rowptr[i]; e < rowptr[i + 1]; ++e) {
        if (e + kPrefetchDistance < E) {
          const int64_t jn = col[e + kPrefetchDistance];
          prefetch_row(k + jn * HC, HC);
          prefetch_row(v + jn * HC, HC);
          if (ef) prefetch_row(ef + static_cast<int64_t>(eid[e + kPrefetchDistance]) * HC, HC);
        }
        const int64_t j = col[e];
        const int64_t edge = (ef || use_dropout) ? static_cast<int64_t>(eid[e]) : 0;
        const scalar_t* efe = ef ? ef + edge * HC : nullptr;
        for (int64_t h = 0; h < H; ++h) {
          const int64_t o = h * C;
          const acc_t x = dot_keyed<scalar_t, acc_t>(qi.data() + o, k + j * HC + o, efe ? efe + o : nullptr, C);
          acc_t a = std::exp(x - lse[i * H + h]);
          if (use_dropout) a = dropout_keep(seed, edge, h, p) ? a * keep_scale : acc_t(0);
          if (a != acc_t(0))
            Dv[i * H + h] += a * dot_keyed<scalar_t, acc_t>(goi.data() + o, v + j * HC + o, efe ? efe + o : nullptr, C);
        }
      }
    }
  });

  // Pass 1: sources, over the transposed graph. Source j's own v_j stays in registers
  // (k_j in cache); per in-edge only q_i and dOut_i are gathered, and they serve the logit,
  // the softmax weight, dS, grad k and grad v alike.
  // Scratch per edge (CSR positions): dS, and with edge features a' too (one cache line
  // per edge: pass 2 writes grad edge_feat where it reads edge_feat, from these).
  const int64_t S = ef ? 2 * H : H;
  at::Tensor ds_t = at::empty({E, S}, lse_t.options());
  acc_t* ds = ds_t.data_ptr<acc_t>();
  parallel_rows_by_cost(colptr, n_src, 3 * HC, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> vj(HC), qs(HC), ak(HC), av(HC);
    for (int64_t j = begin; j < end; ++j) {
      load_scaled(vj.data(), v + j * HC, acc_t(1), HC);
      std::fill(ak.begin(), ak.end(), acc_t(0));
      std::fill(av.begin(), av.end(), acc_t(0));
      for (int64_t t = colptr[j]; t < colptr[j + 1]; ++t) {
        if (t + kPrefetchDistance < E) {
          const int64_t in = csc_row[t + kPrefetchDistance], en = csc_perm[t + kPrefetchDistance];
          prefetch_row(go + in * HC, HC);
          prefetch_row(q + in * HC, HC);
          __builtin_prefetch(lse + in * H, 0, 1);
          __builtin_prefetch(Dv + in * H, 0, 1);
          __builtin_prefetch(ds + en * S, 1, 1);  // written below: a random write per edge
          if (ef || use_dropout) __builtin_prefetch(eid + en, 0, 1);
          if (ef) prefetch_row(ef + static_cast<int64_t>(eid[en]) * HC, HC);
        }
        const int64_t i = csc_row[t], e = csc_perm[t];
        const int64_t edge = (ef || use_dropout) ? static_cast<int64_t>(eid[e]) : 0;
        const scalar_t* qi = q + i * HC;
        const scalar_t* goi = go + i * HC;
        const scalar_t* efe = ef ? ef + edge * HC : nullptr;
        load_scaled(qs.data(), qi, scale, HC);
        for (int64_t h = 0; h < H; ++h) {
          const int64_t o = h * C;
          const scalar_t* eh = efe ? efe + o : nullptr;
          // The logit exactly as the forward computed it (the same function on the same
          // operands), so that a = exp(x - lse) is the forward's weight to the bit.
          const acc_t x = dot_keyed<scalar_t, acc_t>(qs.data() + o, k + j * HC + o, eh, C);
          const acc_t a = std::exp(x - lse[i * H + h]);
          acc_t a_kept = a;
          if (use_dropout) a_kept = dropout_keep(seed, edge, h, p) ? a * keep_scale : acc_t(0);
          acc_t g = 0;
          if (a_kept != acc_t(0)) {
            g = dot_keyed<scalar_t, acc_t>(vj.data() + o, goi + o, nullptr, C);
            if (eh) g += dot_keyed<scalar_t, acc_t>(nullptr, goi + o, eh, C);
          }
          const acc_t d = a_kept * g - a * Dv[i * H + h];
          ds[e * S + h] = d;
          if (ef) ds[e * S + H + h] = a_kept;
          if (d == acc_t(0) && a_kept == acc_t(0)) continue;  // a masked edge: no 0 * inf
          // grad k = scale dS q_i, grad v = a' dOut_i.
          const acc_t ds_scaled = d * scale;
          acc_t* akh = ak.data() + o;
          acc_t* avh = av.data() + o;
          const scalar_t* qh = qi + o;
          const scalar_t* gh = goi + o;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            akh[c] += ds_scaled * static_cast<acc_t>(qh[c]);
            avh[c] += a_kept * static_cast<acc_t>(gh[c]);
          }
        }
      }
      for (int64_t c = 0; c < HC; ++c) {
        gk[j * HC + c] = static_cast<scalar_t>(ak[c]);
        gv[j * HC + c] = static_cast<scalar_t>(av[c]);
      }
    }
  });

  // Pass 2: destinations: grad q = scale sum_j dS k'_ij (k_j gathered once per edge), and
  // grad edge_feat = scale dS q_i + a' dOut_i (each edge written once, where it is read).
  parallel_rows_by_cost(rowptr, n_dst, ef ? 2 * HC : HC, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> gqi(HC), qs(HC), goi(HC);
    for (int64_t i = begin; i < end; ++i) {
      std::fill(gqi.begin(), gqi.end(), acc_t(0));
      if (ef) {
        load_scaled(qs.data(), q + i * HC, scale, HC);
        load_scaled(goi.data(), go + i * HC, acc_t(1), HC);
      }
      for (int64_t e = rowptr[i]; e < rowptr[i + 1]; ++e) {
        if (e + kPrefetchDistance < E) {
          prefetch_row(k + static_cast<int64_t>(col[e + kPrefetchDistance]) * HC, HC);
          if (ef) prefetch_row(ef + static_cast<int64_t>(eid[e + kPrefetchDistance]) * HC, HC);
        }
        const int64_t j = col[e];
        const int64_t edge = ef ? static_cast<int64_t>(eid[e]) : 0;
        const scalar_t* efe = ef ? ef + edge * HC : nullptr;
        for (int64_t h = 0; h < H; ++h) {
          const acc_t d = ds[e * S + h];
          const int64_t o = h * C;
          const scalar_t* kh = k + j * HC + o;
          acc_t* gh = gqi.data() + o;
          if (efe) {
            const scalar_t* eh = efe + o;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c)
              gh[c] += d * (static_cast<acc_t>(kh[c]) + static_cast<acc_t>(eh[c]));
            const acc_t w = ds[e * S + H + h];
            scalar_t* ge = gef + edge * HC + o;
            if (d == acc_t(0) && w == acc_t(0)) {  // a masked edge: 0, not 0 * inf
              std::fill(ge, ge + C, scalar_t(0));
            } else {
              const acc_t* qh = qs.data() + o;
              const acc_t* gho = goi.data() + o;
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) ge[c] = static_cast<scalar_t>(d * qh[c] + w * gho[c]);
            }
          } else {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) gh[c] += d * static_cast<acc_t>(kh[c]);
          }
        }
      }
      for (int64_t c = 0; c < HC; ++c) gq[i * HC + c] = static_cast<scalar_t>(gqi[c] * scale);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> transformer_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rowptr,
    const at::Tensor& col, const at::Tensor& eid, const at::Tensor& colptr,
    const at::Tensor& csc_row, const at::Tensor& csc_perm,
    const std::optional<at::Tensor>& edge_feat, double scale, double dropout,
    const std::optional<at::Tensor>& seed) {
  check_transformer_entry(q, k, v, rowptr, col, eid, edge_feat, scale, dropout,
                          "neptune::transformer_forward");
  const int64_t n_dst = q.size(0), H = q.size(1), C = q.size(2);
  at::Tensor out = at::empty({n_dst, H, C}, q.options());
  at::Tensor lse = at::empty({n_dst, H}, q.options().dtype(acc_dtype(q.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "transformer_forward_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(col.scalar_type(), "transformer_forward_cpu_index", [&] {
      forward_kernel<scalar_t, index_t>(q, k, v, rowptr, col, eid, edge_feat, out, lse, scale,
                                        dropout, seed_value(seed, dropout));
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> transformer_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& eid,
    const at::Tensor& colptr, const at::Tensor& csc_row, const at::Tensor& csc_perm,
    const std::optional<at::Tensor>& edge_feat, const at::Tensor& out, const at::Tensor& lse,
    double scale, double dropout, const std::optional<at::Tensor>& seed) {
  check_transformer_entry(q, k, v, rowptr, col, eid, edge_feat, scale, dropout,
                          "neptune::transformer_backward");
  check_csc(rowptr, col, eid, colptr, csc_row, csc_perm, k.size(0), q.size(0),
            "neptune::transformer_backward");
  check_transformer_backward_tensors(grad_out, out, lse, q);
  const at::Tensor go = grad_out.contiguous();
  at::Tensor gq = at::empty_like(q);
  at::Tensor gk = at::empty_like(k);
  at::Tensor gv = at::empty_like(v);
  at::Tensor gef = edge_feat.has_value() ? at::empty_like(*edge_feat) : at::empty({0}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "transformer_backward_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(col.scalar_type(), "transformer_backward_cpu_index", [&] {
      backward_kernel<scalar_t, index_t>(go, q, k, v, rowptr, col, eid, colptr, csc_row, csc_perm,
                                         edge_feat, out.contiguous(), lse.contiguous(), scale,
                                         dropout, seed_value(seed, dropout), gq, gk, gv, gef);
    });
  });
  return {gq, gk, gv, gef};
}

}  // namespace neptune
