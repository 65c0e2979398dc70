// Fused graph-transformer attention on CUDA: the backward, a pass over the destinations
// and one over the sources (work layout and shared pieces: transformer_cuda.cuh).
#include "attention/transformer/transformer_cuda.cuh"

#include <type_traits>

namespace neptune {
namespace {

// Pass 1: one warp per destination i. Per (edge, head): a from the saved lse, a' after
// dropout, dS = a' <dOut_i, v'_ij> - a D_i, stored for pass 2 (CSR order); grad q_i =
// scale sum_j dS k'_ij; grad edge_feat = dS (scale q_i) + a' dOut_i (each edge has one
// destination, so it is written once).
template <typename scalar_t, typename index_t, int NF, bool POW2>
__global__ void __launch_bounds__(kBlock)
    transformer_pass1_kernel(TransformerParams<scalar_t, index_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (row >= p.n_dst) return;  // the whole warp
  const int64_t H = p.H, C = p.C, HC = p.HC;
  bool ok[NF];
  int head[NF];  // < kTransformerMaxHC: 32 bits
  acc_t qs[NF], go[NF], D[NF], lse[NF], gq[NF];
#pragma unroll
  for (int k = 0; k < NF; ++k) {
    const int64_t f = lane + 32 * k;
    ok[k] = f < HC;
    head[k] = ok[k] ? static_cast<int>(f / C) : 0;
    qs[k] = ld<acc_t>(p.q + row * HC + f, ok[k]) * p.scale;
    go[k] = ld<acc_t>(p.go + row * HC + f, ok[k]);
    D[k] = go[k] * ld<acc_t>(p.out + row * HC + f, ok[k]);
    lse[k] = ok[k] ? p.lse_in[row * H + head[k]] : acc_t(0);
    gq[k] = 0;
  }
  const bool need_eid = p.ef != nullptr || p.dropout;
  const int64_t e_end = p.rowptr[row + 1];
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    head_sum<NF, POW2>(D, lane, C, H, HC);  // D_i = <dOut_i, out_i> per head
  } else {
    // A bfloat16/float16 `out` is rounded to 8/11 bits: D_i from it would leave a row's dS
    // summing to a residue that grad q multiplies by the keys' common part. D_i = sum_j
    // a'_ij <dOut_i, v'_ij> from the edges instead, in the accumulation type (as the CPU).
#pragma unroll
    for (int k = 0; k < NF; ++k) D[k] = 0;
    for (int64_t e = p.rowptr[row]; e < e_end; ++e) {
      const int64_t j = p.col[e];
      const int64_t edge = need_eid ? static_cast<int64_t>(p.eid[e]) : 0;
      acc_t x[NF], g[NF];
#pragma unroll
      for (int k = 0; k < NF; ++k) {
        const int64_t f = lane + 32 * k;
        acc_t key = ld<acc_t>(p.k + j * HC + f, ok[k]);
        acc_t val = ld<acc_t>(p.v + j * HC + f, ok[k]);
        if (p.ef) {
          const acc_t ef = ld<acc_t>(p.ef + edge * HC + f, ok[k]);
          key += ef;
          val += ef;
        }
        x[k] = qs[k] * key;
        g[k] = go[k] * val;
      }
      head_sum<NF, POW2>(x, lane, C, H, HC);
      head_sum<NF, POW2>(g, lane, C, H, HC);
#pragma unroll
      for (int k = 0; k < NF; ++k) {
        if (!ok[k]) continue;
        acc_t a = acc_exp(x[k] - lse[k]);
        if (p.dropout) a = dropout_keep(p.seed, edge, head[k], p.p) ? a * p.keep_scale : acc_t(0);
        if (a != acc_t(0)) D[k] += a * g[k];
      }
    }
  }
  for (int64_t e = p.rowptr[row]; e < e_end; ++e) {
    const int64_t j = p.col[e];
    const int64_t edge = need_eid ? static_cast<int64_t>(p.eid[e]) : 0;
    acc_t key[NF], x[NF], g[NF];
#pragma unroll
    for (int k = 0; k < NF; ++k) {
      const int64_t f = lane + 32 * k;
      key[k] = ld<acc_t>(p.k + j * HC + f, ok[k]);
      acc_t val = ld<acc_t>(p.v + j * HC + f, ok[k]);
      if (p.ef) {
        const acc_t ef = ld<acc_t>(p.ef + edge * HC + f, ok[k]);
        key[k] += ef;
        val += ef;
      }
      x[k] = qs[k] * key[k];
      g[k] = go[k] * val;
    }
    head_sum<NF, POW2>(x, lane, C, H, HC);  // the logit
    head_sum<NF, POW2>(g, lane, C, H, HC);  // <dOut_i, v'_ij>
#pragma unroll
    for (int k = 0; k < NF; ++k) {
      const int64_t f = lane + 32 * k;
      if (!ok[k]) continue;
      const acc_t a = acc_exp(x[k] - lse[k]);
      acc_t a_kept = a;
      if (p.dropout) a_kept = dropout_keep(p.seed, edge, head[k], p.p) ? a * p.keep_scale : acc_t(0);
      // A dropped edge contributes no a' g term, whatever g is (as on the CPU).
      const acc_t g_kept = a_kept != acc_t(0) ? g[k] : acc_t(0);
      const acc_t dS = a_kept * g_kept - a * D[k];
      if (f % C == 0) {
        p.ds[e * H + head[k]] = dS;
        p.ap[e * H + head[k]] = a_kept;
      }
      gq[k] += dS * key[k];
      if (p.gef) p.gef[edge * HC + f] = static_cast<scalar_t>(dS * qs[k] + a_kept * go[k]);
    }
  }
#pragma unroll
  for (int k = 0; k < NF; ++k) {
    const int64_t f = lane + 32 * k;
    if (ok[k]) p.gq[row * HC + f] = static_cast<scalar_t>(gq[k] * p.scale);
  }
}

// Pass 2: one warp per source j over the transposed graph: grad k_j = scale sum_i dS q_i,
// grad v_j = sum_i a' dOut_i. Lanes are independent here (no shuffles).
template <typename scalar_t, typename index_t, int NF>
__global__ void __launch_bounds__(kBlock)
    transformer_pass2_kernel(TransformerParams<scalar_t, index_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t j = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (j >= p.n_src) return;
  const int64_t H = p.H, C = p.C, HC = p.HC;
  bool ok[NF];
  int head[NF];  // < kTransformerMaxHC: 32 bits
  acc_t ak[NF], av[NF];
#pragma unroll
  for (int k = 0; k < NF; ++k) {
    const int64_t f = lane + 32 * k;
    ok[k] = f < HC;
    head[k] = ok[k] ? static_cast<int>(f / C) : 0;
    ak[k] = 0;
    av[k] = 0;
  }
  const int64_t t_end = p.colptr[j + 1];
  for (int64_t t = p.colptr[j]; t < t_end; ++t) {
    const int64_t i = p.csc_row[t];
    const int64_t e = p.csc_perm[t];  // the CSR position: the scratch's row
#pragma unroll
    for (int k = 0; k < NF; ++k) {
      const int64_t f = lane + 32 * k;
      if (!ok[k]) continue;
      const acc_t d = p.ds[e * H + head[k]], w = p.ap[e * H + head[k]];
      if (d == acc_t(0) && w == acc_t(0)) continue;  // (as on the CPU: no 0 * inf)
      ak[k] += d * static_cast<acc_t>(p.q[i * HC + f]);
      av[k] += w * static_cast<acc_t>(p.go[i * HC + f]);
    }
  }
#pragma unroll
  for (int k = 0; k < NF; ++k) {
    const int64_t f = lane + 32 * k;
    if (!ok[k]) continue;
    p.gk[j * HC + f] = static_cast<scalar_t>(ak[k] * p.scale);
    p.gv[j * HC + f] = static_cast<scalar_t>(av[k]);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> transformer_backward_cuda(
    NEPTUNE_ATTENTION_BACKWARD_PARAMS(q, k, v, edge_feat, scale)) {
  check_on_device("neptune::transformer_backward", {{q, "q"}, {grad_out, "grad_out"}, {out, "out"},
                  {lse, "lse"}, {colptr, "colptr"}, {csc_row, "csc_row"}, {csc_perm, "csc_perm"}},
                  std::nullopt, "");
  check_transformer_cuda(q, k, v, rowptr, col, eid, edge_feat, scale, dropout,
                         "neptune::transformer_backward");
  check_csc(rowptr, col, eid, colptr, csc_row, csc_perm, k.size(0), q.size(0),
            "neptune::transformer_backward");
  check_attention_backward_tensors("neptune::transformer_backward", grad_out, out, lse,
                                   q.scalar_type(), q.sizes(), q.size(1));
  const uint64_t seed_v = seed_value(seed, dropout);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor go = grad_out.contiguous(), out_c = out.contiguous(), lse_c = lse.contiguous();
  const int64_t n_src = k.size(0), n_dst = q.size(0), H = q.size(1), C = q.size(2), HC = H * C;
  const int64_t E = col.size(0);
  at::Tensor gq = new_tensor(q.sizes(), q.options());
  at::Tensor gk = new_tensor(k.sizes(), q.options());
  at::Tensor gv = new_tensor(v.sizes(), q.options());
  at::Tensor gef = edge_feat.has_value() ? new_tensor(edge_feat->sizes(), q.options())
                                         : at::empty({0}, q.options());
  const auto acc_opts = lse_c.options();
  at::Tensor ds = new_tensor({E, H}, acc_opts), ap = new_tensor({E, H}, acc_opts);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  NEPTUNE_DISPATCH_FLOAT_AND_INDEX(q.scalar_type(), col.scalar_type(), "transformer_backward_cuda", [&] {
    auto p = transformer_params<scalar_t, index_t>(q, k, v, edge_feat, rowptr, col, eid, scale,
                                                   dropout, seed_v);
    fill_warp_row_backward(p, go, out_c, lse_c, colptr, csc_row, csc_perm, ds, ap, gef);
    p.gq = gq.data_ptr<scalar_t>();
    p.gk = gk.data_ptr<scalar_t>();
    p.gv = gv.data_ptr<scalar_t>();
    with_layout(HC, C, [&](auto nf, auto pow2) {
      constexpr int NF = decltype(nf)::value;
      auto pass1 = transformer_pass1_kernel<scalar_t, index_t, NF, decltype(pow2)::value>;
      auto pass2 = transformer_pass2_kernel<scalar_t, index_t, NF>;
      // Pass 2 reads what pass 1 wrote: the same stream orders them.
      if (n_dst > 0) NEPTUNE_LAUNCH(pass1, warp_blocks(n_dst), stream, p);
      if (n_src > 0) NEPTUNE_LAUNCH(pass2, warp_blocks(n_src), stream, p);
    });
  });
  return {gq, gk, gv, gef};
}

}  // namespace neptune
