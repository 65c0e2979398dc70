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

#include "attention/common/attention_cpu.h"
#include "attention/common/attention_math.h"
#include "attention/transformer/transformer.h"

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

template <typename scalar_t, typename acc_t>
struct TransformerForward {
  const scalar_t* q;
  const scalar_t* k;
  const scalar_t* v;
  const scalar_t* ef;
  int64_t H, C;
  acc_t scale;
  int64_t edge_cost = 2;
  // the row's scratch: scale q[i], then an edge's k_j + edge_feat[e]
  int64_t row_size() const { return 2 * H * C; }
  void begin_row(acc_t* qi, int64_t i) const { load_scaled(qi, q + i * H * C, scale, H * C); }
  void prefetch(int64_t j, int64_t edge) const {
    prefetch_row(k + j * H * C, H * C);
    prefetch_row(v + j * H * C, H * C);
    if (ef) prefetch_row(ef + edge * H * C, H * C);
  }
  const scalar_t* edge_row(int64_t edge, int64_t h) const { return ef ? ef + (edge * H + h) * C : nullptr; }
  // The edge's logits of every head, <scale q_i, k_j (+ edge_feat[e])>, from the row's scratch
  // (forward and backward call this one function on the same operands, so that
  // a = exp(x - lse) is the forward's weight to the bit).
  void logits(acc_t* row, int64_t j, int64_t edge, acc_t* x) const {
    const int64_t HC = H * C;
    const scalar_t* kj = k + j * HC;
    if (ef) {
      const scalar_t* fe = ef + edge * HC;
      acc_t* t = row + HC;
#pragma omp simd
      for (int64_t c = 0; c < HC; ++c) t[c] = static_cast<acc_t>(kj[c]) + static_cast<acc_t>(fe[c]);
      head_dots<acc_t>(row, t, H, C, x);
    } else {
      head_dots<acc_t>(row, kj, H, C, x);
    }
  }
  void accumulate(acc_t* a, acc_t rescale, acc_t w, int64_t j, int64_t edge, int64_t h) const {
    axpy_rescaled<scalar_t, acc_t>(a, rescale, w, v + (j * H + h) * C, edge_row(edge, h), C);
  }
};

template <typename scalar_t, typename index_t>
void backward_kernel(const BackwardCommon<scalar_t, index_t>& b, const at::Tensor& q_t,
                     const at::Tensor& k_t, const at::Tensor& v_t,
                     const std::optional<at::Tensor>& ef_t, double scale_d, at::Tensor& gq_t,
                     at::Tensor& gk_t, at::Tensor& gv_t, at::Tensor& gef_t) {
  using acc_t = at::opmath_type<scalar_t>;
  NEPTUNE_UNPACK_BACKWARD(b);
  const int64_t n_src = k_t.size(0), n_dst = q_t.size(0), H = q_t.size(1), C = q_t.size(2),
                HC = H * C;
  const scalar_t* q = q_t.data_ptr<scalar_t>();
  const scalar_t* k = k_t.data_ptr<scalar_t>();
  const scalar_t* v = v_t.data_ptr<scalar_t>();
  const scalar_t* ef = data_or_null<scalar_t>(ef_t);
  scalar_t* gq = gq_t.data_ptr<scalar_t>();
  scalar_t* gk = gk_t.data_ptr<scalar_t>();
  scalar_t* gv = gv_t.data_ptr<scalar_t>();
  scalar_t* gef = ef ? gef_t.data_ptr<scalar_t>() : nullptr;
  const acc_t scale = static_cast<acc_t>(scale_d);

  // D_i = sum_j a'_ij g_ij = <dOut_i, out_i> per head. With float32/float64 inputs `out`
  // holds the accumulated sum to its last bit and the dot product is used. A bfloat16 or
  // float16 `out` is rounded to 8 or 11 bits: the softmax gradients of a row would then no
  // longer sum to 0, and grad q would pick up that residue times the keys' common part (a key
  // bias, say) - so D is summed from the edges again, in the accumulation type (one more
  // gather of k_j and v_j per edge, at half width).
  at::Tensor d_t = at::empty({n_dst, H}, b.scratch);
  acc_t* Dv = d_t.data_ptr<acc_t>();
  constexpr bool kExactD = !std::is_same_v<scalar_t, acc_t>;
  const TransformerForward<scalar_t, acc_t> fwd{q, k, v, ef, H, C, scale};
  parallel_rows_by_cost(csr.rowptr, n_dst, kExactD ? 2 * HC : HC, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(fwd.row_size());
    std::vector<acc_t> goi(HC), xv(H);
    for (int64_t i = begin; i < end; ++i) {
      if constexpr (!kExactD) {
        row_dots(go + i * HC, out + i * HC, H, C, Dv + i * H);
        continue;
      }
      load_scaled(goi.data(), go + i * HC, acc_t(1), HC);
      fwd.begin_row(row.data(), i);
      for (int64_t h = 0; h < H; ++h) Dv[i * H + h] = 0;
      for (int64_t e = csr.rowptr[i]; e < csr.rowptr[i + 1]; ++e) {
        if (e + kPrefetchDistance < E) fwd.prefetch(csr.col[e + kPrefetchDistance], csr.eid[e + kPrefetchDistance]);
        const int64_t j = csr.col[e], edge = csr.eid[e];
        fwd.logits(row.data(), j, edge, xv.data());
        for (int64_t h = 0; h < H; ++h) {
          const acc_t a = drop.apply(exp_acc(xv[h] - lse[i * H + h]), edge, h);
          if (a != acc_t(0))
            Dv[i * H + h] += a * dot_keyed<scalar_t, acc_t>(goi.data() + h * C, v + (j * H + h) * C,
                                                            fwd.edge_row(edge, h), C);
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
  at::Tensor ds_t = empty_cpu({E, S}, b.scratch);
  acc_t* ds = ds_t.data_ptr<acc_t>();
  parallel_rows_by_cost(csc.colptr, n_src, 3 * HC, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> vj(HC), row(fwd.row_size()), ak(HC), av(HC), xv(H), g_v(H), ge_v(H);
    acc_t* qs = row.data();  // the row's scratch as the forward's: scale q_i first
    acc_t* xs = xv.data();
    acc_t* gs = g_v.data();
    for (int64_t j = begin; j < end; ++j) {
      load_scaled(vj.data(), v + j * HC, acc_t(1), HC);
      std::fill(ak.begin(), ak.end(), acc_t(0));
      std::fill(av.begin(), av.end(), acc_t(0));
      for (int64_t t = csc.colptr[j]; t < csc.colptr[j + 1]; ++t) {
        if (t + kPrefetchDistance < E) {
          const int64_t in = csc.row[t + kPrefetchDistance], en = csc.perm[t + kPrefetchDistance];
          prefetch_rows_of(in, HC, go, q);
          __builtin_prefetch(lse + in * H, 0, 1);
          __builtin_prefetch(Dv + in * H, 0, 1);
          __builtin_prefetch(ds + en * S, 1, 1);  // written below: a random write per edge
          if (ef || drop.on) __builtin_prefetch(csr.eid + en, 0, 1);
          if (ef) prefetch_row(ef + static_cast<int64_t>(csr.eid[en]) * HC, HC);
        }
        const int64_t i = csc.row[t], e = csc.perm[t];
        const int64_t edge = (ef || drop.on) ? static_cast<int64_t>(csr.eid[e]) : 0;
        const scalar_t* qi = q + i * HC;
        const scalar_t* goi = go + i * HC;
        const scalar_t* efe = ef ? ef + edge * HC : nullptr;
        load_scaled(qs, qi, scale, HC);
        // The logits exactly as the forward computed them (the same function on the same
        // operands), so that a = exp(x - lse) is the forward's weight to the bit; the weights
        // and <v_j (+ edge_feat[e]), dOut_i> of every head at once.
        fwd.logits(row.data(), j, edge, xs);
        const acc_t* lsei = lse + i * H;
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) xs[h] = exp_acc(xs[h] - lsei[h]);
        head_dots<acc_t>(vj.data(), goi, H, C, gs);
        if (efe) {
          head_dots<acc_t>(goi, efe, H, C, ge_v.data());
          for (int64_t h = 0; h < H; ++h) gs[h] += ge_v[h];
        }
        for (int64_t h = 0; h < H; ++h) {
          const int64_t o = h * C;
          const acc_t a = xs[h];
          const acc_t a_kept = drop.apply(a, edge, h);
          const acc_t g = a_kept != acc_t(0) ? gs[h] : acc_t(0);
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
  parallel_rows_by_cost(csr.rowptr, n_dst, ef ? 2 * HC : HC, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> gqi(HC), qs(HC), goi(HC);
    for (int64_t i = begin; i < end; ++i) {
      std::fill(gqi.begin(), gqi.end(), acc_t(0));
      if (ef) {
        load_scaled(qs.data(), q + i * HC, scale, HC);
        load_scaled(goi.data(), go + i * HC, acc_t(1), HC);
      }
      for (int64_t e = csr.rowptr[i]; e < csr.rowptr[i + 1]; ++e) {
        if (e + kPrefetchDistance < E) {
          prefetch_row(k + static_cast<int64_t>(csr.col[e + kPrefetchDistance]) * HC, HC);
          if (ef) prefetch_row(ef + static_cast<int64_t>(csr.eid[e + kPrefetchDistance]) * HC, HC);
        }
        const int64_t j = csr.col[e];
        const int64_t edge = ef ? static_cast<int64_t>(csr.eid[e]) : 0;
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
    NEPTUNE_ATTENTION_FORWARD_PARAMS(q, k, v, edge_feat, scale)) {
  check_transformer_entry(q, k, v, rowptr, col, eid, edge_feat, scale, dropout,
                          "neptune::transformer_forward");
  const int64_t H = q.size(1), C = q.size(2);
  return attention_forward_cpu(q, q.sizes(), H, rowptr, col, eid, dropout, seed, [&](auto* type) {
    using scalar_t = std::remove_pointer_t<decltype(type)>;
    using acc_t = at::opmath_type<scalar_t>;
    return TransformerForward<scalar_t, acc_t>{q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                               v.data_ptr<scalar_t>(),
                                               data_or_null<scalar_t>(edge_feat), H, C,
                                               static_cast<acc_t>(scale)};
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> transformer_backward_cpu(
    NEPTUNE_ATTENTION_BACKWARD_PARAMS(q, k, v, edge_feat, scale)) {
  check_transformer_entry(q, k, v, rowptr, col, eid, edge_feat, scale, dropout,
                          "neptune::transformer_backward");
  check_csc(rowptr, col, eid, colptr, csc_row, csc_perm, k.size(0), q.size(0),
            "neptune::transformer_backward");
  check_attention_backward_tensors("neptune::transformer_backward", grad_out, out, lse,
                                   q.scalar_type(), q.sizes(), q.size(1));
  at::Tensor gq = empty_like_cpu(q);
  at::Tensor gk = empty_like_cpu(k);
  at::Tensor gv = empty_like_cpu(v);
  at::Tensor gef = edge_feat.has_value() ? empty_like_cpu(*edge_feat) : at::empty({0}, q.options());
  NEPTUNE_DISPATCH_FLOAT_AND_INDEX(q.scalar_type(), col.scalar_type(), "transformer_backward_cpu", [&] {
    backward_kernel<scalar_t, index_t>(NEPTUNE_BACKWARD_COMMON, q, k, v, edge_feat, scale, gq, gk,
                                       gv, gef);
  });
  return {gq, gk, gv, gef};
}

}  // namespace neptune
