// Training-mode BatchNorm + ReLU on the CPU (the second half of a Stage).
//
// Layouts: NCHW-contiguous x is read as N*C planes of H*W values; channels_last
// x as an [M = N*H*W, C] row-major matrix. Anything else is made contiguous.
// y and grad_x are allocated with x's strides, so the layout is preserved.
//
// Determinism: the data of a channel is cut into pieces whose size depends only
// on the shape (never on the thread count). Each piece is reduced on its own by
// one thread, partial results go to their own slot, and the slots are merged in
// a fixed order. Same inputs -> bitwise same outputs on 1 or 64 threads.
//
// Forward: per piece, a two-pass mean / M2 over data that sits in cache; pieces
// merged with Chan's formula (accurate like a two-pass variance, one read of x
// from memory); then one pass writes y = relu(x * scale + shift).
// Backward: one pass for the per-piece sums of dz and dz * (x - mean), merged
// in order; one pass writes grad_x (see stage_math.h for the formula).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <vector>

#include "stage.h"
#include "stage_math.h"

namespace neptune {
namespace {

// Values per piece: big enough to amortize the per-piece merge, small enough
// that the second pass over a piece hits L2.
constexpr int64_t kPieceElems = 8192;

// How a [N, C, H, W] tensor is cut into pieces.
struct Pieces {
  bool channels_last;
  int64_t N, C, HW, M;
  // NCHW: a piece is `len` consecutive values of one (n, c) plane; per_plane of them.
  int64_t len, per_plane;
  // channels_last: a piece is `rows` consecutive rows of the [M, C] matrix.
  int64_t rows;
  int64_t count;  // number of pieces

  Pieces(const at::Tensor& x, bool cl) : channels_last(cl) {
    N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), M = N * HW;
    if (!cl) {
      len = std::max<int64_t>(1, std::min<int64_t>(HW, kPieceElems));
      per_plane = (HW + len - 1) / len;
      count = N * C * per_plane;
      rows = 0;
    } else {
      rows = std::max<int64_t>(1, kPieceElems / std::max<int64_t>(C, 1));
      count = (M + rows - 1) / rows;
      len = per_plane = 0;
    }
  }
  // Pieces handed to one task: keep tasks at a few thousand values or more.
  int64_t grain() const {
    const int64_t elems = channels_last ? rows * C : len;
    return std::max<int64_t>(1, 4096 / std::max<int64_t>(elems, 1));
  }
};

template <typename scalar_t>
void forward_kernel(const at::Tensor& x_t, const at::Tensor& w_t, const at::Tensor& b_t,
                    double eps, at::Tensor& y_t, at::Tensor& mean_t, at::Tensor& var_t,
                    at::Tensor& invstd_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const Pieces P(x_t, use_channels_last(x_t));
  const int64_t C = P.C;
  const scalar_t* x = x_t.data_ptr<scalar_t>();
  scalar_t* y = y_t.data_ptr<scalar_t>();
  const acc_t* w = w_t.data_ptr<acc_t>();
  const acc_t* b = b_t.data_ptr<acc_t>();
  acc_t* mean = mean_t.data_ptr<acc_t>();
  acc_t* var = var_t.data_ptr<acc_t>();
  acc_t* invstd = invstd_t.data_ptr<acc_t>();

  // Per-piece (count, mean, M2): one slot per piece (NCHW) or per (piece, channel).
  const int64_t slots = P.channels_last ? P.count * C : P.count;
  std::vector<acc_t> p_n(P.channels_last ? P.count : slots), p_mean(slots), p_m2(slots);

  // Pass 1: statistics of every piece.
  at::parallel_for(0, P.count, P.grain(), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s(P.channels_last ? C : 0);
    for (int64_t p = begin; p < end; ++p) {
      if (!P.channels_last) {
        const int64_t plane = p / P.per_plane, k = p % P.per_plane;
        const int64_t lo = k * P.len, hi = std::min(P.HW, lo + P.len);
        const scalar_t* xp = x + plane * P.HW;
        acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = lo; i < hi; ++i) sum += static_cast<acc_t>(xp[i]);
        const acc_t n = static_cast<acc_t>(hi - lo);
        const acc_t mu = sum / n;
        acc_t m2 = 0;
#pragma omp simd reduction(+ : m2)
        for (int64_t i = lo; i < hi; ++i) {
          const acc_t d = static_cast<acc_t>(xp[i]) - mu;
          m2 += d * d;
        }
        p_n[p] = n, p_mean[p] = mu, p_m2[p] = m2;
      } else {
        const int64_t lo = p * P.rows, hi = std::min(P.M, lo + P.rows);
        std::fill(s.begin(), s.end(), acc_t(0));
        for (int64_t r = lo; r < hi; ++r) {
          const scalar_t* xr = x + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) s[c] += static_cast<acc_t>(xr[c]);
        }
        const acc_t n = static_cast<acc_t>(hi - lo);
        acc_t* mu = p_mean.data() + p * C;
        acc_t* m2 = p_m2.data() + p * C;
        for (int64_t c = 0; c < C; ++c) mu[c] = s[c] / n, m2[c] = 0;
        for (int64_t r = lo; r < hi; ++r) {
          const scalar_t* xr = x + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const acc_t d = static_cast<acc_t>(xr[c]) - mu[c];
            m2[c] += d * d;
          }
        }
        p_n[p] = n;
      }
    }
  });

  // Merge the pieces of each channel in a fixed order.
  std::vector<acc_t> scale(C), shift(C);
  at::parallel_for(0, C, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      acc_t n = 0, mu = 0, m2 = 0;
      if (!P.channels_last) {
        for (int64_t nb = 0; nb < P.N; ++nb)
          for (int64_t k = 0; k < P.per_plane; ++k) {
            const int64_t p = (nb * C + c) * P.per_plane + k;
            chan_merge(n, mu, m2, p_n[p], p_mean[p], p_m2[p]);
          }
      } else {
        for (int64_t p = 0; p < P.count; ++p)
          chan_merge(n, mu, m2, p_n[p], p_mean[p * C + c], p_m2[p * C + c]);
      }
      const acc_t v = m2 / n;
      const acc_t r = acc_t(1) / std::sqrt(v + static_cast<acc_t>(eps));
      mean[c] = mu, var[c] = v, invstd[c] = r;
      const BnAffine<acc_t> a = bn_affine(w[c], b[c], mu, r);
      scale[c] = a.scale, shift[c] = a.shift;
    }
  });
  const acc_t* sc = scale.data();
  const acc_t* sh = shift.data();

  // Pass 2: y = relu(x * scale + shift).
  at::parallel_for(0, P.count, P.grain(), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      if (!P.channels_last) {
        const int64_t plane = p / P.per_plane, k = p % P.per_plane;
        const int64_t lo = k * P.len, hi = std::min(P.HW, lo + P.len);
        const BnAffine<acc_t> a{sc[plane % C], sh[plane % C]};
        const scalar_t* xp = x + plane * P.HW;
        scalar_t* yp = y + plane * P.HW;
#pragma omp simd
        for (int64_t i = lo; i < hi; ++i)
          yp[i] = static_cast<scalar_t>(relu_value(bn_pre_activation(static_cast<acc_t>(xp[i]), a)));
      } else {
        const int64_t lo = p * P.rows, hi = std::min(P.M, lo + P.rows);
        for (int64_t r = lo; r < hi; ++r) {
          const scalar_t* xr = x + r * C;
          scalar_t* yr = y + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c)
            yr[c] = static_cast<scalar_t>(
                relu_value(bn_pre_activation(static_cast<acc_t>(xr[c]), BnAffine<acc_t>{sc[c], sh[c]})));
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& gy_t, const at::Tensor& x_t, const at::Tensor& w_t,
                     const at::Tensor& b_t, const at::Tensor& mean_t, const at::Tensor& invstd_t,
                     at::Tensor& gx_t, at::Tensor& gw_t, at::Tensor& gb_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const Pieces P(x_t, use_channels_last(x_t));
  const int64_t C = P.C;
  const scalar_t* gy = gy_t.data_ptr<scalar_t>();
  const scalar_t* x = x_t.data_ptr<scalar_t>();
  scalar_t* gx = gx_t.data_ptr<scalar_t>();
  const acc_t* w = w_t.data_ptr<acc_t>();
  const acc_t* b = b_t.data_ptr<acc_t>();
  const acc_t* mean = mean_t.data_ptr<acc_t>();
  const acc_t* invstd = invstd_t.data_ptr<acc_t>();
  acc_t* gw = gw_t.data_ptr<acc_t>();
  acc_t* gb = gb_t.data_ptr<acc_t>();

  // Per-channel vectors as plain arrays (structure of arrays) so the
  // channels_last inner loops over c vectorize.
  std::vector<acc_t> scale(C), shift(C);
  for (int64_t c = 0; c < C; ++c) {
    const BnAffine<acc_t> a = bn_affine(w[c], b[c], mean[c], invstd[c]);
    scale[c] = a.scale, shift[c] = a.shift;
  }
  const acc_t* sc = scale.data();
  const acc_t* sh = shift.data();

  // Pass 1: per-piece sums of dz and dz * (x - mean), dz = grad_y * [z > 0].
  // grad_y is loaded unconditionally so the mask is a select, not a branch.
  const int64_t slots = P.channels_last ? P.count * C : P.count;
  std::vector<acc_t> p_dz(slots), p_dzx(slots);
  at::parallel_for(0, P.count, P.grain(), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      if (!P.channels_last) {
        const int64_t plane = p / P.per_plane, k = p % P.per_plane;
        const int64_t lo = k * P.len, hi = std::min(P.HW, lo + P.len);
        const int64_t c = plane % C;
        const BnAffine<acc_t> a{sc[c], sh[c]};
        const acc_t mu = mean[c];
        const scalar_t* xp = x + plane * P.HW;
        const scalar_t* gp = gy + plane * P.HW;
        acc_t s_dz = 0, s_dzx = 0;
#pragma omp simd reduction(+ : s_dz, s_dzx)
        for (int64_t i = lo; i < hi; ++i) {
          const acc_t xv = static_cast<acc_t>(xp[i]);
          const acc_t gv = static_cast<acc_t>(gp[i]);
          const acc_t dz = relu_passes(bn_pre_activation(xv, a)) ? gv : acc_t(0);
          s_dz += dz;
          s_dzx += dz * (xv - mu);
        }
        p_dz[p] = s_dz, p_dzx[p] = s_dzx;
      } else {
        const int64_t lo = p * P.rows, hi = std::min(P.M, lo + P.rows);
        acc_t* s_dz = p_dz.data() + p * C;
        acc_t* s_dzx = p_dzx.data() + p * C;
        std::fill(s_dz, s_dz + C, acc_t(0));
        std::fill(s_dzx, s_dzx + C, acc_t(0));
        for (int64_t r = lo; r < hi; ++r) {
          const scalar_t* xr = x + r * C;
          const scalar_t* gr = gy + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const acc_t xv = static_cast<acc_t>(xr[c]);
            const acc_t gv = static_cast<acc_t>(gr[c]);
            const acc_t dz = relu_passes(bn_pre_activation(xv, BnAffine<acc_t>{sc[c], sh[c]})) ? gv : acc_t(0);
            s_dz[c] += dz;
            s_dzx[c] += dz * (xv - mean[c]);
          }
        }
      }
    }
  });

  // Merge in a fixed order; per-channel coefficients of grad_x.
  std::vector<acc_t> k_dz(C), k_xmu(C), k_0(C);
  const acc_t count = static_cast<acc_t>(P.M);
  for (int64_t c = 0; c < C; ++c) {
    acc_t s_dz = 0, s_dzx = 0;
    if (!P.channels_last) {
      for (int64_t nb = 0; nb < P.N; ++nb)
        for (int64_t k = 0; k < P.per_plane; ++k) {
          const int64_t p = (nb * C + c) * P.per_plane + k;
          s_dz += p_dz[p], s_dzx += p_dzx[p];
        }
    } else {
      for (int64_t p = 0; p < P.count; ++p) s_dz += p_dz[p * C + c], s_dzx += p_dzx[p * C + c];
    }
    gb[c] = s_dz;
    gw[c] = s_dzx * invstd[c];
    const BnReluGradCoef<acc_t> kc = bn_relu_grad_coef(w[c], invstd[c], s_dz, s_dzx, count);
    k_dz[c] = kc.k_dz, k_xmu[c] = kc.k_xmu, k_0[c] = kc.k_0;
  }
  const acc_t* kd = k_dz.data();
  const acc_t* kx = k_xmu.data();
  const acc_t* k0 = k_0.data();

  // Pass 2: grad_x.
  at::parallel_for(0, P.count, P.grain(), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      if (!P.channels_last) {
        const int64_t plane = p / P.per_plane, k = p % P.per_plane;
        const int64_t lo = k * P.len, hi = std::min(P.HW, lo + P.len);
        const int64_t c = plane % C;
        const BnAffine<acc_t> a{sc[c], sh[c]};
        const BnReluGradCoef<acc_t> kc{kd[c], kx[c], k0[c]};
        const acc_t mu = mean[c];
        const scalar_t* xp = x + plane * P.HW;
        const scalar_t* gp = gy + plane * P.HW;
        scalar_t* op = gx + plane * P.HW;
#pragma omp simd
        for (int64_t i = lo; i < hi; ++i) {
          const acc_t xv = static_cast<acc_t>(xp[i]);
          const acc_t gv = static_cast<acc_t>(gp[i]);
          const acc_t dz = relu_passes(bn_pre_activation(xv, a)) ? gv : acc_t(0);
          op[i] = static_cast<scalar_t>(bn_relu_grad_x(dz, xv - mu, kc));
        }
      } else {
        const int64_t lo = p * P.rows, hi = std::min(P.M, lo + P.rows);
        for (int64_t r = lo; r < hi; ++r) {
          const scalar_t* xr = x + r * C;
          const scalar_t* gr = gy + r * C;
          scalar_t* orow = gx + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const acc_t xv = static_cast<acc_t>(xr[c]);
            const acc_t gv = static_cast<acc_t>(gr[c]);
            const acc_t dz = relu_passes(bn_pre_activation(xv, BnAffine<acc_t>{sc[c], sh[c]})) ? gv : acc_t(0);
            orow[c] = static_cast<scalar_t>(
                bn_relu_grad_x(dz, xv - mean[c], BnReluGradCoef<acc_t>{kd[c], kx[c], k0[c]}));
          }
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_forward_cpu(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_bn_relu_inputs("bn_relu_forward", x_in, weight, bias);
  const at::Tensor x = dense(x_in);
  const auto acc = acc_dtype(x.scalar_type());
  const at::Tensor w = weight.to(acc).contiguous(), b = bias.to(acc).contiguous();
  const int64_t C = x.size(1);
  at::Tensor y = at::empty_like(x);  // x is dense: y gets exactly x's strides
  at::Tensor mean = at::empty({C}, x.options().dtype(acc));
  at::Tensor var = at::empty({C}, x.options().dtype(acc));
  at::Tensor invstd = at::empty({C}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_forward_cpu", [&] {
    forward_kernel<scalar_t>(x, w, b, eps, y, mean, var, invstd);
  });
  return {y, mean, var, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& invstd) {
  at::Tensor x, gy, w, b, mu, rs, gx, gw, gb;
  std::tie(x, gy, w, b, mu, rs, gx, gw, gb) =
      bn_relu_backward_operands(grad_y, x_in, weight, bias, mean, invstd);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_backward_cpu", [&] {
    backward_kernel<scalar_t>(gy, x, w, b, mu, rs, gx, gw, gb);
  });
  return {gx, gw.to(weight.scalar_type()), gb.to(bias.scalar_type())};
}

}  // namespace neptune
