// Fused GATv2 attention on CUDA (semantics and passes: gatv2.h; the same math header
// as the CPU kernels).
//
// Work layout (attention/common/warp_row_cuda.cuh): one warp per row (a destination in forward
// and backward pass 1, a source in pass 2), NF features per lane, so H * C <= 1024. A
// head's logit is the sum of att * LeakyReLU(z) over its C features, spread over lanes
// by head_sum; every lane of a head ends with the same bits, so they take the same
// softmax steps.
// Nothing uses floating-point atomics: grad att is per-row partial sums reduced over
// fixed blocks of rows, then over the blocks in order - bitwise reproducible.
//
// This header holds what the forward (gatv2_fwd_cuda.cu) and the backward
// (gatv2_bwd_cuda.cu) share: the params struct and the entry checks. Two translation
// units, compiled in parallel.
#pragma once

#include "attention/common/warp_row_cuda.cuh"
#include "attention/gatv2/gatv2.h"

namespace neptune {
namespace {

constexpr int64_t kGatv2MaxHC = kWarpRowMaxHC;  // 1024
constexpr int64_t kAttRowsPerBlock = 256;  // rows summed per partial of grad att

template <typename scalar_t, typename index_t>
struct V2Params : WarpRowParams<scalar_t, index_t> {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* xl;
  const scalar_t* xr;
  const scalar_t* att;
  acc_t* ga_rows;  // [n_dst, HC] per-row grad att
  scalar_t* gxl;
  scalar_t* gxr;
  int64_t n_rows;
  acc_t slope;
};

// The entry checks of gatv2.h, plus: every tensor on x_l's GPU, rows a warp can hold.
inline void check_v2_cuda(const at::Tensor& xl, const at::Tensor& xr, const at::Tensor& att,
                   const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& eid,
                   const std::optional<at::Tensor>& edge_feat, double negative_slope, double dropout,
                   const char* op) {
  check_gatv2_inputs(xl, xr, att, rowptr, col, eid, edge_feat, negative_slope, dropout);
  check_on_device(op, {{xl, "x_l"}, {xr, "x_r"}, {att, "att"}, {rowptr, "rowptr"}, {col, "col"},
                       {eid, "eid"}}, edge_feat, "edge_feat");
  const auto [H, C] = gatv2_heads(att);
  TORCH_CHECK(C > 0 && H * C <= kGatv2MaxHC,
              "neptune::gatv2 (CUDA): H * C must be in [1, ", kGatv2MaxHC, "], got H = ", H,
              ", C = ", C);
  check_csr(rowptr, col, eid, xl.size(0), rowptr.size(0) - 1, op);
}

// The fields forward and backward share.
template <typename scalar_t, typename index_t>
V2Params<scalar_t, index_t> common_params(const at::Tensor& xl, const at::Tensor& xr, const at::Tensor& att,
                                          const std::optional<at::Tensor>& edge_feat,
                                          const at::Tensor& rowptr, const at::Tensor& col,
                                          const at::Tensor& eid, double negative_slope, double dropout,
                                          uint64_t seed) {
  V2Params<scalar_t, index_t> p{};
  fill_warp_row_params(p, edge_feat, rowptr, col, eid, xr.size(0), att.size(-2), att.size(-1), dropout,
                       seed);
  p.xl = xl.data_ptr<scalar_t>();
  p.xr = xr.data_ptr<scalar_t>();
  p.att = att.data_ptr<scalar_t>();
  p.slope = static_cast<at::opmath_type<scalar_t>>(negative_slope);
  return p;
}

}  // namespace
}  // namespace neptune
