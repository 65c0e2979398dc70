// Fused graph-transformer attention on CUDA: the forward (work layout and shared pieces:
// transformer_cuda.cuh).
#include "attention/transformer/transformer_cuda.cuh"

namespace neptune {
namespace {

// The graph transformer's logit and value for the shared warp forward
// (attention/common/warp_row_cuda.cuh): q_i (scaled once per row) stays in registers; k_j, v_j
// (and e_ij) are gathered per edge.
struct TransformerForward {
  template <int NF, typename acc_t>
  struct Row {
    acc_t qs[NF];
  };
  template <typename R, typename P>
  __device__ __forceinline__ static void load(R& r, const P& p, int64_t row, int k, int64_t f, bool ok) {
    using acc_t = std::remove_reference_t<decltype(r.qs[0])>;
    r.qs[k] = ld<acc_t>(p.q + row * p.HC + f, ok) * p.scale;
  }
  template <typename R, typename P, typename acc_t>
  __device__ __forceinline__ static void edge(const R& r, const P& p, int64_t j, int64_t edge, int k,
                                              int64_t f, bool ok, acc_t& x, acc_t& val) {
    acc_t key = ld<acc_t>(p.k + j * p.HC + f, ok);
    val = ld<acc_t>(p.v + j * p.HC + f, ok);
    if (p.ef) {
      const acc_t ef = ld<acc_t>(p.ef + edge * p.HC + f, ok);
      key += ef;
      val += ef;
    }
    x = r.qs[k] * key;  // 0 past H * C
  }
};

template <typename scalar_t, typename index_t, int NF, bool POW2>
__global__ void __launch_bounds__(kBlock)
    transformer_forward_kernel(TransformerParams<scalar_t, index_t> p) {
  warp_forward_row<TransformerForward, scalar_t, NF, POW2>(p);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> transformer_forward_cuda(
    NEPTUNE_ATTENTION_FORWARD_PARAMS(q, k, v, edge_feat, scale)) {
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
