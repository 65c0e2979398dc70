// Training-mode BatchNorm + ReLU on CUDA (the second half of a Stage).
//
// Semantics: exactly those of stage_cpu.cpp; the per-element math (affine,
// ReLU mask, Chan merge, gradient coefficients) comes from stage_math.h.
//
// Layouts: NCHW-contiguous x is read as N*C planes of H*W values; channels_last
// x as an [M = N*H*W, C] row-major matrix; anything else is made contiguous.
// y and grad_x get x's strides.
//
// Every reduction is two-stage and deterministic (no atomics):
//  1. a "partial" kernel: one block per piece of a channel's data (NCHW: kPiece
//     consecutive values of one plane; NHWC: kRows rows x 32 channels). Threads
//     accumulate (count, mean, M2) with Welford (forward) or plain sums
//     (backward) over a fixed subset, then merge in a fixed tree order; one
//     record per (piece, channel).
//  2. a "finalize" kernel: one block per channel merges that channel's records
//     (thread t takes records t, t + 256, ... in order; then a fixed tree), and
//     writes the statistics and the per-channel coefficients of the last pass.
//  3. an elementwise kernel (grid-stride) writes y or grad_x.
// The piece sizes depend only on the shape, so results are bitwise
// reproducible from run to run.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "stage.h"
#include "stage_math.h"

namespace neptune {
namespace {

constexpr int kBlock = 256;          // threads per block
constexpr int64_t kPiece = 4096;     // NCHW: values of one plane per partial block
constexpr int kColTile = 32;         // NHWC: channels per partial block (blockDim.x)
constexpr int kRowLanes = kBlock / kColTile;  // NHWC: blockDim.y
constexpr int64_t kRows = 256;       // NHWC: rows per partial block
constexpr int64_t kMaxGrid = 65535 * 16;  // elementwise grid cap (grid-stride beyond)

struct Layout {
  bool cl;
  int64_t N, C, HW, M;
  int64_t per_plane;  // NCHW: pieces per plane
  int64_t pieces;     // records per channel
  Layout(const at::Tensor& x, bool channels_last) : cl(channels_last) {
    N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), M = N * HW;
    if (!cl) {
      per_plane = (HW + kPiece - 1) / kPiece;
      pieces = N * per_plane;
    } else {
      per_plane = 0;
      pieces = (M + kRows - 1) / kRows;
    }
  }
  // Index of record q (0 <= q < pieces) of channel c.
  __host__ __device__ int64_t record(int64_t q, int64_t c) const {
    if (!cl) {
      const int64_t nb = q / per_plane, k = q % per_plane;
      return (nb * C + c) * per_plane + k;
    }
    return q * C + c;
  }
  __host__ __device__ int64_t channel_of(int64_t i) const { return cl ? i % C : (i / HW) % C; }
};

__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename acc_t>
__device__ __forceinline__ void welford_add(acc_t& n, acc_t& mu, acc_t& m2, acc_t v) {
  n += acc_t(1);
  const acc_t d = v - mu;
  mu += d / n;
  m2 += d * (v - mu);
}

// Fixed-order tree merge of kBlock (count, mean, M2) records in shared memory;
// the result lands in slot 0. All threads of the block must call it.
template <typename acc_t>
__device__ void block_merge_stats(acc_t* sn, acc_t* smu, acc_t* sm2) {
  const int t = threadIdx.x;
  __syncthreads();
  for (int s = kBlock / 2; s > 0; s >>= 1) {
    if (t < s) chan_merge(sn[t], smu[t], sm2[t], sn[t + s], smu[t + s], sm2[t + s]);
    __syncthreads();
  }
}

template <typename acc_t>
__device__ void block_sum2(acc_t* sa, acc_t* sb) {
  const int t = threadIdx.x;
  __syncthreads();
  for (int s = kBlock / 2; s > 0; s >>= 1) {
    if (t < s) sa[t] += sa[t + s], sb[t] += sb[t + s];
    __syncthreads();
  }
}

// ---------------------------------------------------------------- forward

// NCHW: block p = piece k of plane (nb, c); record index p.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlock) stats_partial_nchw(const scalar_t* __restrict__ x, Layout L,
                                                             acc_t* pn, acc_t* pmu, acc_t* pm2) {
  __shared__ acc_t sn[kBlock], smu[kBlock], sm2[kBlock];
  const int64_t p = blockIdx.x;
  const int64_t plane = p / L.per_plane, k = p % L.per_plane;
  const int64_t lo = k * kPiece, hi = imin(L.HW, lo + kPiece);
  const scalar_t* xp = x + plane * L.HW;
  acc_t n = 0, mu = 0, m2 = 0;
  for (int64_t i = lo + threadIdx.x; i < hi; i += kBlock) welford_add(n, mu, m2, static_cast<acc_t>(xp[i]));
  sn[threadIdx.x] = n, smu[threadIdx.x] = mu, sm2[threadIdx.x] = m2;
  block_merge_stats(sn, smu, sm2);
  if (threadIdx.x == 0) pn[p] = sn[0], pmu[p] = smu[0], pm2[p] = sm2[0];
}

// NHWC: block (q, ct): rows [q*kRows, ...) x channels [ct*32, ct*32+32); record q*C + c.
// blockDim = (kColTile, kRowLanes).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlock) stats_partial_nhwc(const scalar_t* __restrict__ x, Layout L,
                                                             acc_t* pn, acc_t* pmu, acc_t* pm2) {
  __shared__ acc_t sn[kRowLanes][kColTile], smu[kRowLanes][kColTile], sm2[kRowLanes][kColTile];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t q = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kColTile + tx;
  const int64_t lo = q * kRows, hi = imin(L.M, lo + kRows);
  acc_t n = 0, mu = 0, m2 = 0;
  if (c < L.C)
    for (int64_t r = lo + ty; r < hi; r += kRowLanes) welford_add(n, mu, m2, static_cast<acc_t>(x[r * L.C + c]));
  sn[ty][tx] = n, smu[ty][tx] = mu, sm2[ty][tx] = m2;
  __syncthreads();
  if (ty == 0 && c < L.C) {
    for (int j = 1; j < kRowLanes; ++j) chan_merge(n, mu, m2, sn[j][tx], smu[j][tx], sm2[j][tx]);
    const int64_t rec = q * L.C + c;
    pn[rec] = n, pmu[rec] = mu, pm2[rec] = m2;
  }
}

// One block per channel. coef = [scale (C), shift (C)].
template <typename acc_t>
__global__ void __launch_bounds__(kBlock) stats_finalize(Layout L, const acc_t* pn, const acc_t* pmu,
                                                         const acc_t* pm2, const acc_t* w, const acc_t* b,
                                                         double eps, acc_t* mean, acc_t* var, acc_t* invstd,
                                                         acc_t* coef) {
  __shared__ acc_t sn[kBlock], smu[kBlock], sm2[kBlock];
  const int64_t c = blockIdx.x;
  acc_t n = 0, mu = 0, m2 = 0;
  for (int64_t q = threadIdx.x; q < L.pieces; q += kBlock) {
    const int64_t r = L.record(q, c);
    chan_merge(n, mu, m2, pn[r], pmu[r], pm2[r]);
  }
  sn[threadIdx.x] = n, smu[threadIdx.x] = mu, sm2[threadIdx.x] = m2;
  block_merge_stats(sn, smu, sm2);
  if (threadIdx.x == 0) {
    const acc_t v = sm2[0] / sn[0];
    const acc_t r = acc_t(1) / ::sqrt(v + static_cast<acc_t>(eps));
    mean[c] = smu[0], var[c] = v, invstd[c] = r;
    const BnAffine<acc_t> a = bn_affine(w[c], b[c], smu[0], r);
    coef[c] = a.scale, coef[L.C + c] = a.shift;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlock) bn_relu_apply(const scalar_t* __restrict__ x, Layout L,
                                                        const acc_t* __restrict__ coef, scalar_t* __restrict__ y,
                                                        int64_t numel) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kBlock;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x; i < numel; i += stride) {
    const int64_t c = L.channel_of(i);
    const BnAffine<acc_t> a{coef[c], coef[L.C + c]};
    y[i] = static_cast<scalar_t>(relu_value(bn_pre_activation(static_cast<acc_t>(x[i]), a)));
  }
}

// ---------------------------------------------------------------- backward

// coef on input: [scale (C), shift (C)]; mean [C].
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void grad_terms(scalar_t xs, scalar_t gs, acc_t sc, acc_t sh, acc_t mu, acc_t& dz,
                                           acc_t& xmu) {
  const acc_t xv = static_cast<acc_t>(xs);
  const acc_t gv = static_cast<acc_t>(gs);
  dz = relu_passes(bn_pre_activation(xv, BnAffine<acc_t>{sc, sh})) ? gv : acc_t(0);
  xmu = xv - mu;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlock) grad_partial_nchw(const scalar_t* __restrict__ gy,
                                                            const scalar_t* __restrict__ x, Layout L,
                                                            const acc_t* coef, const acc_t* mean, acc_t* pdz,
                                                            acc_t* pdzx) {
  __shared__ acc_t sa[kBlock], sb[kBlock];
  const int64_t p = blockIdx.x;
  const int64_t plane = p / L.per_plane, k = p % L.per_plane;
  const int64_t c = plane % L.C;
  const int64_t lo = k * kPiece, hi = imin(L.HW, lo + kPiece);
  const acc_t sc = coef[c], sh = coef[L.C + c], mu = mean[c];
  acc_t s_dz = 0, s_dzx = 0;
  for (int64_t i = lo + threadIdx.x; i < hi; i += kBlock) {
    acc_t dz, xmu;
    grad_terms(x[plane * L.HW + i], gy[plane * L.HW + i], sc, sh, mu, dz, xmu);
    s_dz += dz, s_dzx += dz * xmu;
  }
  sa[threadIdx.x] = s_dz, sb[threadIdx.x] = s_dzx;
  block_sum2(sa, sb);
  if (threadIdx.x == 0) pdz[p] = sa[0], pdzx[p] = sb[0];
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlock) grad_partial_nhwc(const scalar_t* __restrict__ gy,
                                                            const scalar_t* __restrict__ x, Layout L,
                                                            const acc_t* coef, const acc_t* mean, acc_t* pdz,
                                                            acc_t* pdzx) {
  __shared__ acc_t sa[kRowLanes][kColTile], sb[kRowLanes][kColTile];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t q = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kColTile + tx;
  const int64_t lo = q * kRows, hi = imin(L.M, lo + kRows);
  acc_t s_dz = 0, s_dzx = 0;
  if (c < L.C) {
    const acc_t sc = coef[c], sh = coef[L.C + c], mu = mean[c];
    for (int64_t r = lo + ty; r < hi; r += kRowLanes) {
      acc_t dz, xmu;
      grad_terms(x[r * L.C + c], gy[r * L.C + c], sc, sh, mu, dz, xmu);
      s_dz += dz, s_dzx += dz * xmu;
    }
  }
  sa[ty][tx] = s_dz, sb[ty][tx] = s_dzx;
  __syncthreads();
  if (ty == 0 && c < L.C) {
    for (int j = 1; j < kRowLanes; ++j) s_dz += sa[j][tx], s_dzx += sb[j][tx];
    pdz[q * L.C + c] = s_dz, pdzx[q * L.C + c] = s_dzx;
  }
}

// One block per channel. kc = [k_dz (C), k_xmu (C), k_0 (C)].
template <typename acc_t>
__global__ void __launch_bounds__(kBlock) grad_finalize(Layout L, const acc_t* pdz, const acc_t* pdzx,
                                                        const acc_t* w, const acc_t* invstd, acc_t* gw,
                                                        acc_t* gb, acc_t* kc) {
  __shared__ acc_t sa[kBlock], sb[kBlock];
  const int64_t c = blockIdx.x;
  acc_t s_dz = 0, s_dzx = 0;
  for (int64_t q = threadIdx.x; q < L.pieces; q += kBlock) {
    const int64_t r = L.record(q, c);
    s_dz += pdz[r], s_dzx += pdzx[r];
  }
  sa[threadIdx.x] = s_dz, sb[threadIdx.x] = s_dzx;
  block_sum2(sa, sb);
  if (threadIdx.x == 0) {
    gb[c] = sa[0];
    gw[c] = sb[0] * invstd[c];
    const BnReluGradCoef<acc_t> k = bn_relu_grad_coef(w[c], invstd[c], sa[0], sb[0], static_cast<acc_t>(L.M));
    kc[c] = k.k_dz, kc[L.C + c] = k.k_xmu, kc[2 * L.C + c] = k.k_0;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlock) grad_apply(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x,
                                                     Layout L, const acc_t* __restrict__ coef,
                                                     const acc_t* __restrict__ mean, const acc_t* __restrict__ kc,
                                                     scalar_t* __restrict__ gx, int64_t numel) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kBlock;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x; i < numel; i += stride) {
    const int64_t c = L.channel_of(i);
    acc_t dz, xmu;
    grad_terms(x[i], gy[i], coef[c], coef[L.C + c], mean[c], dz, xmu);
    gx[i] = static_cast<scalar_t>(bn_relu_grad_x(dz, xmu, BnReluGradCoef<acc_t>{kc[c], kc[L.C + c], kc[2 * L.C + c]}));
  }
}

__global__ void __launch_bounds__(kBlock) affine_coef_f(int64_t C, const float* w, const float* b, const float* mean,
                                                        const float* invstd, float* coef) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  if (c < C) {
    const BnAffine<float> a = bn_affine(w[c], b[c], mean[c], invstd[c]);
    coef[c] = a.scale, coef[C + c] = a.shift;
  }
}
__global__ void __launch_bounds__(kBlock) affine_coef_d(int64_t C, const double* w, const double* b,
                                                        const double* mean, const double* invstd, double* coef) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  if (c < C) {
    const BnAffine<double> a = bn_affine(w[c], b[c], mean[c], invstd[c]);
    coef[c] = a.scale, coef[C + c] = a.shift;
  }
}

unsigned int elementwise_grid(int64_t numel) {
  return static_cast<unsigned int>(std::min<int64_t>((numel + kBlock - 1) / kBlock, kMaxGrid));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_forward_cuda(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_bn_relu_inputs("bn_relu_forward", x_in, weight, bias);
  TORCH_CHECK(x_in.is_cuda() && weight.device() == x_in.device() && bias.device() == x_in.device(),
              "neptune::bn_relu_forward: x, weight and bias must be on the same CUDA device");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const auto acc = acc_dtype(x.scalar_type());
  const at::Tensor w = weight.to(acc).contiguous(), b = bias.to(acc).contiguous();
  const Layout L(x, use_channels_last(x));
  const int64_t C = L.C;
  TORCH_CHECK(L.N * C * L.per_plane < (int64_t(1) << 31) && L.pieces < (int64_t(1) << 31) && C < (int64_t(1) << 31),
              "neptune::bn_relu_forward: tensor too large for the CUDA kernel: ", x.sizes());
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({C}, x.options().dtype(acc));
  at::Tensor var = at::empty({C}, x.options().dtype(acc));
  at::Tensor invstd = at::empty({C}, x.options().dtype(acc));
  at::Tensor coef = at::empty({2 * C}, x.options().dtype(acc));
  at::Tensor part = at::empty({3, L.pieces * C}, x.options().dtype(acc));
  const int64_t numel = x.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* pn = part.data_ptr<acc_t>();
    acc_t* pmu = pn + L.pieces * C;
    acc_t* pm2 = pmu + L.pieces * C;
    if (!L.cl) {
      stats_partial_nchw<scalar_t, acc_t><<<static_cast<unsigned int>(L.N * C * L.per_plane), kBlock, 0, stream>>>(
          x.data_ptr<scalar_t>(), L, pn, pmu, pm2);
    } else {
      const dim3 grid(static_cast<unsigned int>(L.pieces), static_cast<unsigned int>((C + kColTile - 1) / kColTile));
      stats_partial_nhwc<scalar_t, acc_t><<<grid, dim3(kColTile, kRowLanes), 0, stream>>>(
          x.data_ptr<scalar_t>(), L, pn, pmu, pm2);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    stats_finalize<acc_t><<<static_cast<unsigned int>(C), kBlock, 0, stream>>>(
        L, pn, pmu, pm2, w.data_ptr<acc_t>(), b.data_ptr<acc_t>(), eps, mean.data_ptr<acc_t>(),
        var.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), coef.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bn_relu_apply<scalar_t, acc_t><<<elementwise_grid(numel), kBlock, 0, stream>>>(
        x.data_ptr<scalar_t>(), L, coef.data_ptr<acc_t>(), y.data_ptr<scalar_t>(), numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mean, var, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& invstd) {
  at::Tensor x, gy, w, b, mu, rs, gx, gw, gb;
  std::tie(x, gy, w, b, mu, rs, gx, gw, gb) =
      bn_relu_backward_operands(grad_y, x_in, weight, bias, mean, invstd);
  const int64_t C = x.size(1);
  const auto dev = x_in.device();
  TORCH_CHECK(x_in.is_cuda() && grad_y.device() == dev && weight.device() == dev && bias.device() == dev &&
                  mean.device() == dev && invstd.device() == dev,
              "neptune::bn_relu_backward: all tensors must be on the same CUDA device");
  const c10::cuda::CUDAGuard guard(dev);
  const auto acc = acc_dtype(x_in.scalar_type());
  const Layout L(x, use_channels_last(x));
  TORCH_CHECK(L.N * C * L.per_plane < (int64_t(1) << 31) && L.pieces < (int64_t(1) << 31) && C < (int64_t(1) << 31),
              "neptune::bn_relu_backward: tensor too large for the CUDA kernel: ", x.sizes());
  at::Tensor coef = at::empty({2 * C}, x.options().dtype(acc));
  at::Tensor kc = at::empty({3 * C}, x.options().dtype(acc));
  at::Tensor part = at::empty({2, L.pieces * C}, x.options().dtype(acc));
  const int64_t numel = x.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned int cgrid = static_cast<unsigned int>((C + kBlock - 1) / kBlock);
  if (acc == at::kDouble) {
    affine_coef_d<<<cgrid, kBlock, 0, stream>>>(C, w.data_ptr<double>(), b.data_ptr<double>(), mu.data_ptr<double>(),
                                                rs.data_ptr<double>(), coef.data_ptr<double>());
  } else {
    affine_coef_f<<<cgrid, kBlock, 0, stream>>>(C, w.data_ptr<float>(), b.data_ptr<float>(), mu.data_ptr<float>(),
                                                rs.data_ptr<float>(), coef.data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* pdz = part.data_ptr<acc_t>();
    acc_t* pdzx = pdz + L.pieces * C;
    if (!L.cl) {
      grad_partial_nchw<scalar_t, acc_t><<<static_cast<unsigned int>(L.N * C * L.per_plane), kBlock, 0, stream>>>(
          gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), L, coef.data_ptr<acc_t>(), mu.data_ptr<acc_t>(), pdz, pdzx);
    } else {
      const dim3 grid(static_cast<unsigned int>(L.pieces), static_cast<unsigned int>((C + kColTile - 1) / kColTile));
      grad_partial_nhwc<scalar_t, acc_t><<<grid, dim3(kColTile, kRowLanes), 0, stream>>>(
          gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), L, coef.data_ptr<acc_t>(), mu.data_ptr<acc_t>(), pdz, pdzx);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grad_finalize<acc_t><<<static_cast<unsigned int>(C), kBlock, 0, stream>>>(
        L, pdz, pdzx, w.data_ptr<acc_t>(), rs.data_ptr<acc_t>(), gw.data_ptr<acc_t>(), gb.data_ptr<acc_t>(),
        kc.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grad_apply<scalar_t, acc_t><<<elementwise_grid(numel), kBlock, 0, stream>>>(
        gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), L, coef.data_ptr<acc_t>(), mu.data_ptr<acc_t>(),
        kc.data_ptr<acc_t>(), gx.data_ptr<scalar_t>(), numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gx, gw.to(weight.scalar_type()), gb.to(bias.scalar_type())};
}

}  // namespace neptune
