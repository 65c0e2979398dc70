// Fused GATv2 attention on CUDA: the forward (work layout and shared pieces: gatv2_cuda.cuh).
#include "gatv2_cuda.cuh"

namespace neptune {
namespace {

template <typename scalar_t, typename index_t, int NF, bool POW2>
__global__ void __launch_bounds__(kBlock) gatv2_forward_kernel(V2Params<scalar_t, index_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (row >= p.n_dst) return;  // the whole warp
  const int64_t H = p.H, C = p.C, HC = p.HC;
  bool ok[NF];
  int64_t head[NF];
  acc_t xr[NF], att[NF], acc[NF], m[NF], s[NF];
#pragma unroll
  for (int k = 0; k < NF; ++k) {
    const int64_t f = lane + 32 * k;
    ok[k] = f < HC;
    head[k] = ok[k] ? f / C : 0;
    xr[k] = ld<acc_t>(p.xr + row * HC + f, ok[k]);
    att[k] = ld<acc_t>(p.att + f, ok[k]);
    acc[k] = 0;
    m[k] = -std::numeric_limits<acc_t>::infinity();
    s[k] = 0;
  }
  const bool need_eid = p.ef != nullptr || p.dropout;
  const int64_t e_end = p.rowptr[row + 1];
  for (int64_t e = p.rowptr[row]; e < e_end; ++e) {
    const int64_t j = p.col[e];
    const int64_t edge = need_eid ? static_cast<int64_t>(p.eid[e]) : 0;
    acc_t xl[NF], v[NF];
#pragma unroll
    for (int k = 0; k < NF; ++k) {
      const int64_t f = lane + 32 * k;
      xl[k] = ld<acc_t>(p.xl + j * HC + f, ok[k]);
      acc_t z = xl[k] + xr[k];
      if (p.ef) z += ld<acc_t>(p.ef + edge * HC + f, ok[k]);
      v[k] = ok[k] ? att[k] * leaky_relu(z, p.slope) : acc_t(0);
    }
    head_sum<NF, POW2>(v, lane, C, H, HC);
#pragma unroll
    for (int k = 0; k < NF; ++k) {
      acc_t rescale, w;
      online_softmax_step(v[k], m[k], s[k], rescale, w);
      if (p.dropout) w = dropout_keep(p.seed, edge, head[k], p.p) ? w * p.keep_scale : acc_t(0);
      acc[k] = acc[k] * rescale + w * xl[k];
    }
  }
#pragma unroll
  for (int k = 0; k < NF; ++k) {
    const int64_t f = lane + 32 * k;
    if (!ok[k]) continue;
    const bool any = softmax_has_mass(s[k]);
    p.out_w[row * HC + f] = static_cast<scalar_t>(any ? acc[k] / s[k] : acc_t(0));
    if (f % C == 0) p.lse[row * H + head[k]] = any ? m[k] + acc_log(s[k]) : acc_t(0);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gatv2_forward_cuda(
    const at::Tensor& xl, const at::Tensor& xr, const at::Tensor& att, const at::Tensor& rowptr,
    const at::Tensor& col, const at::Tensor& eid, const at::Tensor& colptr,
    const at::Tensor& csc_row, const at::Tensor& csc_perm,
    const std::optional<at::Tensor>& edge_feat, double negative_slope, double dropout,
    const std::optional<at::Tensor>& seed) {
  check_v2_cuda(xl, xr, att, rowptr, col, eid, edge_feat, negative_slope, dropout,
                "neptune::gatv2_forward");
  const uint64_t seed_v = seed_value(seed, dropout);
  const c10::cuda::CUDAGuard guard(xl.device());
  const int64_t n_dst = xr.size(0), H = xl.size(1), C = xl.size(2);
  at::Tensor out = new_tensor({n_dst, H, C}, xl.options());
  at::Tensor lse = new_tensor({n_dst, H}, xl.options().dtype(acc_dtype(xl.scalar_type())));
  if (n_dst == 0) return {out, lse};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  NEPTUNE_DISPATCH_FLOAT_AND_INDEX(xl.scalar_type(), col.scalar_type(), "gatv2_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto p = common_params<scalar_t, index_t>(xl, xr, att, edge_feat, rowptr, col, eid,
                                              negative_slope, dropout, seed_v);
    p.out_w = out.data_ptr<scalar_t>();
    p.lse = lse.data_ptr<acc_t>();
    with_layout(H * C, C, [&](auto nf, auto pow2) {
      auto kernel = gatv2_forward_kernel<scalar_t, index_t, decltype(nf)::value, decltype(pow2)::value>;
      NEPTUNE_LAUNCH(kernel, warp_blocks(n_dst), stream, p);
    });
  });
  return {out, lse};
}

}  // namespace neptune
