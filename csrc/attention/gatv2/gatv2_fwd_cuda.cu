// Fused GATv2 attention on CUDA: the forward (work layout and shared pieces: gatv2_cuda.cuh).
#include "attention/gatv2/gatv2_cuda.cuh"

namespace neptune {
namespace {

// GATv2's logit and value for the shared warp forward (attention/common/warp_row_cuda.cuh):
// x_r[i] and att stay in registers; x_l[j] (and edge_feat) are gathered per edge.
struct Gatv2Forward {
  template <int NF, typename acc_t>
  struct Row {
    acc_t xr[NF], att[NF];
  };
  template <typename R, typename P>
  __device__ __forceinline__ static void load(R& r, const P& p, int64_t row, int k, int64_t f, bool ok) {
    using acc_t = std::remove_reference_t<decltype(r.xr[0])>;
    r.xr[k] = ld<acc_t>(p.xr + row * p.HC + f, ok);
    r.att[k] = ld<acc_t>(p.att + f, ok);
  }
  template <typename R, typename P, typename acc_t>
  __device__ __forceinline__ static void edge(const R& r, const P& p, int64_t j, int64_t edge, int k,
                                              int64_t f, bool ok, acc_t& x, acc_t& val) {
    val = ld<acc_t>(p.xl + j * p.HC + f, ok);
    acc_t z = val + r.xr[k];
    if (p.ef) z += ld<acc_t>(p.ef + edge * p.HC + f, ok);
    x = ok ? r.att[k] * leaky_relu(z, p.slope) : acc_t(0);
  }
};

template <typename scalar_t, typename index_t, int NF, bool POW2>
__global__ void __launch_bounds__(kBlock) gatv2_forward_kernel(V2Params<scalar_t, index_t> p) {
  warp_forward_row<Gatv2Forward, scalar_t, NF, POW2>(p);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gatv2_forward_cuda(
    NEPTUNE_ATTENTION_FORWARD_PARAMS(xl, xr, att, edge_feat, negative_slope)) {
  check_v2_cuda(xl, xr, att, rowptr, col, eid, edge_feat, negative_slope, dropout,
                "neptune::gatv2_forward");
  const uint64_t seed_v = seed_value(seed, dropout);
  const c10::cuda::CUDAGuard guard(xl.device());
  const int64_t n_dst = xr.size(0);
  const auto [H, C] = gatv2_heads(att);
  at::Tensor out = new_tensor(xr.sizes(), xl.options());
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
