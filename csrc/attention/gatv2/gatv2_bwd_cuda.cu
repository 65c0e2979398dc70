// Fused GATv2 attention on CUDA: the backward, two passes and the fixed-order grad att
// reduction (work layout and shared pieces: gatv2_cuda.cuh).
#include "attention/gatv2/gatv2_cuda.cuh"

namespace neptune {
namespace {

// Pass 1: destinations. dS and a' per (edge, head), grad x_r, grad edge_feat and the
// row's part of grad att.
template <typename scalar_t, typename index_t, int NF, bool POW2>
__global__ void __launch_bounds__(kBlock) gatv2_pass1_kernel(V2Params<scalar_t, index_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (row >= p.n_dst) return;
  const int64_t H = p.H, C = p.C, HC = p.HC;
  bool ok[NF];
  int64_t head[NF];
  acc_t xr[NF], att[NF], go[NF], D[NF], lse[NF], gx[NF], ga[NF];
#pragma unroll
  for (int k = 0; k < NF; ++k) {
    const int64_t f = lane + 32 * k;
    ok[k] = f < HC;
    head[k] = ok[k] ? f / C : 0;
    xr[k] = ld<acc_t>(p.xr + row * HC + f, ok[k]);
    att[k] = ld<acc_t>(p.att + f, ok[k]);
    go[k] = ld<acc_t>(p.go + row * HC + f, ok[k]);
    D[k] = go[k] * ld<acc_t>(p.out + row * HC + f, ok[k]);
    lse[k] = ok[k] ? p.lse_in[row * H + head[k]] : acc_t(0);
    gx[k] = 0;
    ga[k] = 0;
  }
  head_sum<NF, POW2>(D, lane, C, H, HC);
  const bool need_eid = p.ef != nullptr || p.dropout || p.gef != nullptr;
  const int64_t e_end = p.rowptr[row + 1];
  for (int64_t e = p.rowptr[row]; e < e_end; ++e) {
    const int64_t j = p.col[e];
    const int64_t edge = need_eid ? static_cast<int64_t>(p.eid[e]) : 0;
    acc_t xl[NF], z[NF], v[NF], g[NF];
#pragma unroll
    for (int k = 0; k < NF; ++k) {
      const int64_t f = lane + 32 * k;
      xl[k] = ld<acc_t>(p.xl + j * HC + f, ok[k]);
      z[k] = xl[k] + xr[k];
      if (p.ef) z[k] += ld<acc_t>(p.ef + edge * HC + f, ok[k]);
      v[k] = ok[k] ? att[k] * leaky_relu(z[k], p.slope) : acc_t(0);
      g[k] = go[k] * xl[k];
    }
    head_sum<NF, POW2>(v, lane, C, H, HC);
    head_sum<NF, POW2>(g, lane, C, H, HC);
#pragma unroll
    for (int k = 0; k < NF; ++k) {
      const int64_t f = lane + 32 * k;
      if (!ok[k]) continue;
      const acc_t a = acc_exp(v[k] - lse[k]);
      acc_t a_kept = a;
      if (p.dropout) a_kept = dropout_keep(p.seed, edge, head[k], p.p) ? a * p.keep_scale : acc_t(0);
      const acc_t dS = a_kept * g[k] - a * D[k];
      if (f % C == 0) {
        p.ds[e * H + head[k]] = dS;
        p.ap[e * H + head[k]] = a_kept;
      }
      const acc_t gz = dS * att[k] * leaky_relu_grad(z[k], p.slope);
      gx[k] += gz;
      ga[k] += dS * leaky_relu(z[k], p.slope);
      if (p.gef) p.gef[edge * HC + f] = static_cast<scalar_t>(gz);
    }
  }
#pragma unroll
  for (int k = 0; k < NF; ++k) {
    const int64_t f = lane + 32 * k;
    if (!ok[k]) continue;
    p.gxr[row * HC + f] = static_cast<scalar_t>(gx[k]);
    p.ga_rows[row * HC + f] = ga[k];
  }
}

// Pass 2: sources over the transposed graph: grad x_l.
template <typename scalar_t, typename index_t, int NF>
__global__ void __launch_bounds__(kBlock) gatv2_pass2_kernel(V2Params<scalar_t, index_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t j = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (j >= p.n_rows) return;
  const int64_t H = p.H, C = p.C, HC = p.HC;
  bool ok[NF];
  int64_t head[NF];
  acc_t xl[NF], att[NF], acc[NF];
#pragma unroll
  for (int k = 0; k < NF; ++k) {
    const int64_t f = lane + 32 * k;
    ok[k] = f < HC;
    head[k] = ok[k] ? f / C : 0;
    xl[k] = ld<acc_t>(p.xl + j * HC + f, ok[k]);
    att[k] = ld<acc_t>(p.att + f, ok[k]);
    acc[k] = 0;
  }
  const int64_t t_end = p.colptr[j + 1];
  for (int64_t t = p.colptr[j]; t < t_end; ++t) {
    const int64_t i = p.csc_row[t];
    if (i >= p.n_dst) continue;  // an ignored row: no gradient
    const int64_t e = p.csc_perm[t];
    const int64_t edge = p.ef ? static_cast<int64_t>(p.eid[e]) : 0;
#pragma unroll
    for (int k = 0; k < NF; ++k) {
      const int64_t f = lane + 32 * k;
      if (!ok[k]) continue;
      const acc_t w = p.ap[e * H + head[k]], d = p.ds[e * H + head[k]];
      acc_t z = xl[k] + static_cast<acc_t>(p.xr[i * HC + f]);
      if (p.ef) z += static_cast<acc_t>(p.ef[edge * HC + f]);
      acc[k] += w * static_cast<acc_t>(p.go[i * HC + f]) + d * att[k] * leaky_relu_grad(z, p.slope);
    }
  }
#pragma unroll
  for (int k = 0; k < NF; ++k) {
    const int64_t f = lane + 32 * k;
    if (ok[k]) p.gxl[j * HC + f] = static_cast<scalar_t>(acc[k]);
  }
}

// grad att, deterministic: part[b, f] = sum of rows [b R, (b + 1) R) of ga_rows ...
template <typename acc_t>
__global__ void __launch_bounds__(kBlock)
    gatv2_att_partial_kernel(const acc_t* ga_rows, acc_t* part, int64_t n_dst, int64_t HC,
                             int64_t n_blocks) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= n_blocks * HC) return;
  const int64_t b = t / HC, f = t % HC;
  const int64_t end = imin(n_dst, (b + 1) * kAttRowsPerBlock);
  acc_t s = 0;
  for (int64_t r = b * kAttRowsPerBlock; r < end; ++r) s += ga_rows[r * HC + f];
  part[b * HC + f] = s;
}

// ... then gatt[f] = sum over b in order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlock)
    gatv2_att_final_kernel(const acc_t* part, scalar_t* gatt, int64_t n_blocks, int64_t HC) {
  const int64_t f = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (f >= HC) return;
  acc_t s = 0;
  for (int64_t b = 0; b < n_blocks; ++b) s += part[b * HC + f];
  gatt[f] = static_cast<scalar_t>(s);
}

// Edges of the ignored rows (>= n_dst) get a zero grad edge_feat: one warp per row.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kBlock)
    gatv2_zero_ignored_kernel(const index_t* rowptr, const index_t* eid, scalar_t* gef,
                              int64_t n_dst, int64_t n_rows, int64_t HC) {
  const int64_t row = n_dst + ((static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= n_rows) return;
  for (int64_t e = rowptr[row]; e < rowptr[row + 1]; ++e)
    for (int64_t f = lane; f < HC; f += 32) gef[static_cast<int64_t>(eid[e]) * HC + f] = scalar_t(0);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gatv2_backward_cuda(
    NEPTUNE_ATTENTION_BACKWARD_PARAMS(xl, xr, att, edge_feat, negative_slope)) {
  check_v2_cuda(xl, xr, att, rowptr, col, eid, edge_feat, negative_slope, dropout,
                "neptune::gatv2_backward");
  check_on_device("neptune::gatv2_backward", {{xl, "x_l"}, {grad_out, "grad_out"}, {out, "out"},
                  {lse, "lse"}, {colptr, "colptr"}, {csc_row, "csc_row"}, {csc_perm, "csc_perm"}},
                  std::nullopt, "");
  check_csc(rowptr, col, eid, colptr, csc_row, csc_perm, xl.size(0), rowptr.size(0) - 1,
            "neptune::gatv2_backward");
  check_attention_backward_tensors("neptune::gatv2_backward", grad_out, out, lse, xr.scalar_type(),
                                   xr.sizes(), gatv2_heads(att).first);
  const uint64_t seed_v = seed_value(seed, dropout);
  const c10::cuda::CUDAGuard guard(xl.device());
  const at::Tensor go = grad_out.contiguous(), out_c = out.contiguous(), lse_c = lse.contiguous();
  const auto [H, C] = gatv2_heads(att);
  const int64_t n_src = xl.size(0), n_dst = xr.size(0), HC = H * C;
  const int64_t E = col.size(0), n_rows = rowptr.size(0) - 1;
  at::Tensor gxl = new_tensor(xl.sizes(), xl.options());
  at::Tensor gxr = new_tensor(xr.sizes(), xl.options());
  at::Tensor gatt = new_tensor(att.sizes(), xl.options());
  at::Tensor gef = edge_feat.has_value() ? new_tensor(edge_feat->sizes(), xl.options())
                                         : at::empty({0}, xl.options());
  const auto acc_opts = lse_c.options();
  at::Tensor ds = new_tensor({E, H}, acc_opts), ap = new_tensor({E, H}, acc_opts);
  at::Tensor ga_rows = new_tensor({n_dst, HC}, acc_opts);
  const int64_t n_blocks = ceil_div(n_dst, kAttRowsPerBlock);
  at::Tensor part = new_tensor({n_blocks, HC}, acc_opts);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  NEPTUNE_DISPATCH_FLOAT_AND_INDEX(xl.scalar_type(), col.scalar_type(), "gatv2_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto p = common_params<scalar_t, index_t>(xl, xr, att, edge_feat, rowptr, col, eid,
                                              negative_slope, dropout, seed_v);
    fill_warp_row_backward(p, go, out_c, lse_c, colptr, csc_row, csc_perm, ds, ap, gef);
    p.ga_rows = ga_rows.data_ptr<acc_t>();
    p.gxl = gxl.data_ptr<scalar_t>();
    p.gxr = gxr.data_ptr<scalar_t>();
    with_layout(HC, C, [&](auto nf, auto pow2) {
      constexpr int NF = decltype(nf)::value;
      auto pass1 = gatv2_pass1_kernel<scalar_t, index_t, NF, decltype(pow2)::value>;
      auto pass2 = gatv2_pass2_kernel<scalar_t, index_t, NF>;
      if (n_dst > 0) NEPTUNE_LAUNCH(pass1, warp_blocks(n_dst), stream, p);
      p.n_rows = n_src;
      if (n_src > 0) NEPTUNE_LAUNCH(pass2, warp_blocks(n_src), stream, p);
    });
    if (p.gef && n_rows > n_dst) {
      auto zero_ignored = gatv2_zero_ignored_kernel<scalar_t, index_t>;
      NEPTUNE_LAUNCH(zero_ignored, warp_blocks(n_rows - n_dst), stream, p.rowptr, p.eid, p.gef, n_dst,
                     n_rows, HC);
    }
    acc_t* part_p = part.data_ptr<acc_t>();
    if (n_blocks > 0) {
      auto partial = gatv2_att_partial_kernel<acc_t>;
      NEPTUNE_LAUNCH(partial, ceil_div(n_blocks * HC, kBlock), stream, p.ga_rows, part_p, n_dst, HC,
                     n_blocks);
    }
    auto final_sum = gatv2_att_final_kernel<scalar_t, acc_t>;
    NEPTUNE_LAUNCH(final_sum, ceil_div(HC, kBlock), stream, part_p, gatt.data_ptr<scalar_t>(), n_blocks, HC);
  });
  return {gxl, gxr, gatt, gef};
}

}  // namespace neptune
