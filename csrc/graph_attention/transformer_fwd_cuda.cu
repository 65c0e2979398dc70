// Fused graph-transformer attention on CUDA: the forward (work layout and shared pieces:
// transformer_cuda.cuh).
#include "transformer_cuda.cuh"

namespace neptune {
namespace {

// One warp per destination: an online softmax over its in-edges; out and lse.
template <typename scalar_t, typename index_t, int NF, bool POW2>
__global__ void __launch_bounds__(kBlock)
    transformer_forward_kernel(TransformerParams<scalar_t, index_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (row >= p.n_dst) return;  // the whole warp
  const int64_t H = p.H, C = p.C, HC = p.HC;
  bool ok[NF];
  int head[NF];  // < kTransformerMaxHC: 32 bits
  acc_t qs[NF], acc[NF], m[NF], s[NF];
#pragma unroll
  for (int k = 0; k < NF; ++k) {
    const int64_t f = lane + 32 * k;
    ok[k] = f < HC;
    head[k] = ok[k] ? static_cast<int>(f / C) : 0;
    qs[k] = ld<acc_t>(p.q + row * HC + f, ok[k]) * p.scale;  // scale q_i once per row
    acc[k] = 0;
    m[k] = -std::numeric_limits<acc_t>::infinity();
    s[k] = 0;
  }
  const bool need_eid = p.ef != nullptr || p.dropout;
  const int64_t e_end = p.rowptr[row + 1];
  for (int64_t e = p.rowptr[row]; e < e_end; ++e) {
    const int64_t j = p.col[e];
    const int64_t edge = need_eid ? static_cast<int64_t>(p.eid[e]) : 0;
    acc_t x[NF], val[NF];
#pragma unroll
    for (int k = 0; k < NF; ++k) {
      const int64_t f = lane + 32 * k;
      acc_t key = ld<acc_t>(p.k + j * HC + f, ok[k]);
      val[k] = ld<acc_t>(p.v + j * HC + f, ok[k]);
      if (p.ef) {
        const acc_t ef = ld<acc_t>(p.ef + edge * HC + f, ok[k]);
        key += ef;
        val[k] += ef;
      }
      x[k] = qs[k] * key;  // 0 past H * C
    }
    head_sum<NF, POW2>(x, lane, C, H, HC);
#pragma unroll
    for (int k = 0; k < NF; ++k) {
      acc_t rescale, w;
      online_softmax_step(x[k], m[k], s[k], rescale, w);
      if (p.dropout) w = dropout_keep(p.seed, edge, head[k], p.p) ? w * p.keep_scale : acc_t(0);
      acc[k] = acc[k] * rescale + w * val[k];
    }
  }
#pragma unroll
  for (int k = 0; k < NF; ++k) {
    const int64_t f = lane + 32 * k;
    if (!ok[k]) continue;
    const bool any = softmax_has_mass(s[k]);
    const acc_t inv = any ? acc_t(1) / s[k] : acc_t(0);
    p.out_w[row * HC + f] = static_cast<scalar_t>(acc[k] * inv);
    if (f % C == 0) p.lse[row * H + head[k]] = any ? m[k] + acc_log(s[k]) : acc_t(0);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> transformer_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rowptr,
    const at::Tensor& col, const at::Tensor& eid, const at::Tensor& colptr,
    const at::Tensor& csc_row, const at::Tensor& csc_perm,
    const std::optional<at::Tensor>& edge_feat, double scale, double dropout,
    const std::optional<at::Tensor>& seed) {
  check_transformer_cuda(q, k, v, rowptr, col, eid, edge_feat, scale, dropout,
                         "neptune::transformer_forward");
  const uint64_t seed_v = seed_value(seed, dropout);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t n_dst = q.size(0), H = q.size(1), C = q.size(2);
  at::Tensor out = new_tensor({n_dst, H, C}, q.options());
  at::Tensor lse = new_tensor({n_dst, H}, q.options().dtype(acc_dtype(q.scalar_type())));
  if (n_dst == 0) return {out, lse};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  NEPTUNE_DISPATCH_FLOAT_AND_INDEX(q.scalar_type(), col.scalar_type(), "transformer_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto p = transformer_params<scalar_t, index_t>(q, k, v, edge_feat, rowptr, col, eid, scale,
                                                   dropout, seed_v);
    p.out_w = out.data_ptr<scalar_t>();
    p.lse = lse.data_ptr<acc_t>();
    with_layout(H * C, C, [&](auto nf, auto pow2) {
      auto kernel = transformer_forward_kernel<scalar_t, index_t, decltype(nf)::value,
                                               decltype(pow2)::value>;
      NEPTUNE_LAUNCH(kernel, warp_blocks(n_dst), stream, p);
    });
  });
  return {out, lse};
}

}  // namespace neptune
