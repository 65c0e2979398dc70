// Fused graph-transformer attention on CUDA: the backward, a pass over the destinations
// and one over the sources (work layout and shared pieces: transformer_cuda.cuh).
#include "attention/transformer/transformer_cuda.cuh"

#include <type_traits>

namespace neptune {
namespace {

// Pass 1: one warp per destination i, one walk over its edges. Per (edge, head): the
// logit (the forward's), a = exp(x - lse), a' after dropout and a'g with g = <dOut_i, v'_ij>,
// stored for pass 2 (CSR order), and per head the sums D = sum_j a'g, A = sum_j a and, with
// kbar the key k'_ij of the row's first edge of non-zero weight,
//   P = sum_j a'g (k'_ij - kbar),   Q = sum_j a (k'_ij - kbar).
// The weights carry lse's rounding (eps |lse|, the same for every edge of a row), so A is 1
// only to that rounding; with a large common key part (a key bias, logits of tens) grad q
// would pick up k_common D (1 - A). The softmax backward therefore takes the weights
// normalized, a / A, and D / A for D - a row's dS then sum to 0 by construction:
//   dS_j = (a'g_j - a_j D / A) / A,   grad q_i = scale (P - (D / A) Q) / A
// (the kbar sum_j dS_j part is 0: softmax ignores a common shift of the logits), so each key
// is read once and the common key part never enters a difference. D is summed from the
// edges in the accumulation type for every dtype (a bfloat16/float16 `out` is rounded). The
// row's D / A and 1 / A go to pass 2 (row_d, row_inv); with edge features a second walk over
// the row reads only the scratch: grad edge_feat = dS (scale q_i) + (a' / A) dOut_i (each
// edge has one destination, so it is written once).
template <typename scalar_t, typename index_t, int NF, bool POW2>
__global__ void __launch_bounds__(kBlock)
    transformer_pass1_kernel(TransformerParams<scalar_t, index_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (row >= p.n_dst) return;  // the whole warp
  const int64_t H = p.H, C = p.C, HC = p.HC;
  bool ok[NF], has_kbar[NF];
  int head[NF];  // < kTransformerMaxHC: 32 bits
  acc_t qs[NF], go[NF], lse[NF], D[NF], A[NF], P[NF], Q[NF], kbar[NF];
#pragma unroll
  for (int k = 0; k < NF; ++k) {
    const int64_t f = lane + 32 * k;
    ok[k] = f < HC;
    head[k] = ok[k] ? static_cast<int>(f / C) : 0;
    qs[k] = ld<acc_t>(p.q + row * HC + f, ok[k]) * p.scale;
    go[k] = ld<acc_t>(p.go + row * HC + f, ok[k]);
    lse[k] = ok[k] ? p.lse_in[row * H + head[k]] : acc_t(0);
    D[k] = A[k] = P[k] = Q[k] = kbar[k] = 0;
    has_kbar[k] = false;
  }
  const bool need_eid = p.ef != nullptr || p.dropout;
  const int64_t e_begin = p.rowptr[row], e_end = p.rowptr[row + 1];
  for (int64_t e = e_begin; e < e_end; ++e) {
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
    head_sum<NF, POW2>(x, lane, C, H, HC);  // the logit (the forward's, to the bit)
    head_sum<NF, POW2>(g, lane, C, H, HC);  // <dOut_i, v'_ij>
#pragma unroll
    for (int k = 0; k < NF; ++k) {
      const int64_t f = lane + 32 * k;
      if (!ok[k]) continue;
      const acc_t a = acc_exp(x[k] - lse[k]);
      acc_t a_kept = a;
      if (p.dropout) a_kept = dropout_keep(p.seed, edge, head[k], p.p) ? a * p.keep_scale : acc_t(0);
      // A dropped edge contributes no a' g term, whatever g is (as on the CPU).
      const acc_t ag = a_kept != acc_t(0) ? a_kept * g[k] : acc_t(0);
      if (f % C == 0) {
        p.aw[e * H + head[k]] = a;
        p.ap[e * H + head[k]] = a_kept;
        p.ds[e * H + head[k]] = ag;
      }
      D[k] += ag;
      if (a != acc_t(0)) {
        if (!has_kbar[k]) {  // (the same on every lane of a head: they hold the same a)
          kbar[k] = key[k];
          has_kbar[k] = true;
        }
        A[k] += a;
      }
      // A masked edge (a = a'g = 0) adds 0 - or NaN for an infinite key, as its 0 * k'_ij
      // in grad q does on the CPU and in autograd (before kbar is set, k'_ij - 0).
      const acc_t dk = key[k] - kbar[k];
      P[k] += ag * dk;
      Q[k] += a * dk;
    }
  }
#pragma unroll
  for (int k = 0; k < NF; ++k) {
    const int64_t f = lane + 32 * k;
    if (!ok[k]) continue;
    // 1 / A and D / A (0 for a row without weights: nothing flows back through it)
    const acc_t inv = A[k] != acc_t(0) ? acc_t(1) / A[k] : acc_t(0);
    A[k] = inv;
    D[k] *= inv;
    p.gq[row * HC + f] = static_cast<scalar_t>((P[k] - D[k] * Q[k]) * inv * p.scale);
    if (f % C == 0) {
      p.row_d[row * H + head[k]] = D[k];
      p.row_inv[row * H + head[k]] = inv;
    }
  }
  if (!p.gef) return;
  // The scratch of a head was written by its first lane: every lane's writes are seen
  // before any lane reads them (lanes run independently between shuffles).
  __syncwarp();
  for (int64_t e = e_begin; e < e_end; ++e) {
    const int64_t edge = p.eid[e];
#pragma unroll
    for (int k = 0; k < NF; ++k) {
      const int64_t f = lane + 32 * k;
      if (!ok[k]) continue;
      const int64_t s = e * H + head[k];
      const acc_t d = (p.ds[s] - p.aw[s] * D[k]) * A[k];  // (A[k] holds 1 / A, D[k] D / A)
      const acc_t w = p.ap[s] * A[k];
      // a masked edge: 0, not 0 * inf (as on the CPU)
      p.gef[edge * HC + f] = (d == acc_t(0) && w == acc_t(0))
                                 ? scalar_t(0)
                                 : static_cast<scalar_t>(d * qs[k] + w * go[k]);
    }
  }
}

// Pass 2: one warp per source j over the transposed graph: grad k_j = scale sum_i dS q_i,
// grad v_j = sum_i (a' / A_i) dOut_i. Lanes are independent here (no shuffles).
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
      // dS and a' / A from pass 1's scratch and destination i's D / A and 1 / A
      const int64_t s = e * H + head[k], r = i * H + head[k];
      const acc_t inv = p.row_inv[r];
      const acc_t d = (p.ds[s] - p.aw[s] * p.row_d[r]) * inv, w = p.ap[s] * inv;
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
  // pass 1 -> pass 2: per (edge, head) a'g, a' and a; per (destination, head) D / A and 1 / A
  at::Tensor ds = new_tensor({E, H}, acc_opts), ap = new_tensor({E, H}, acc_opts);
  at::Tensor aw = new_tensor({E, H}, acc_opts);
  at::Tensor row_d = new_tensor({n_dst, H}, acc_opts), row_inv = new_tensor({n_dst, H}, acc_opts);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  NEPTUNE_DISPATCH_FLOAT_AND_INDEX(q.scalar_type(), col.scalar_type(), "transformer_backward_cuda", [&] {
    auto p = transformer_params<scalar_t, index_t>(q, k, v, edge_feat, rowptr, col, eid, scale,
                                                   dropout, seed_v);
    fill_warp_row_backward(p, go, out_c, lse_c, colptr, csc_row, csc_perm, ds, ap, gef);
    using acc_t = at::opmath_type<scalar_t>;
    p.aw = aw.data_ptr<acc_t>();
    p.row_d = row_d.data_ptr<acc_t>();
    p.row_inv = row_inv.data_ptr<acc_t>();
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
