// Math shared by the CPU and CUDA Stage (BatchNorm + ReLU) kernels.
//
// Everything here is __host__ __device__ so both back ends normalize, mask and
// reduce the same way. The forward and the backward compute the pre-activation
// z = x * scale + shift through the same function, so the ReLU mask that the
// backward recomputes is bitwise the mask the forward applied.
#pragma once

#include <cmath>
#include <cstdint>

#ifndef NEPTUNE_HD
#if defined(__CUDACC__)
#define NEPTUNE_HD __host__ __device__ __forceinline__
#else
#define NEPTUNE_HD inline
#endif
#endif

namespace neptune {

// Per-channel affine of training-mode BatchNorm with batch statistics:
//   z = weight * (x - mean) * invstd + bias = x * scale + shift.
template <typename T>
struct BnAffine {
  T scale, shift;
};

template <typename T>
NEPTUNE_HD BnAffine<T> bn_affine(T weight, T bias, T mean, T invstd) {
  const T scale = weight * invstd;
  return {scale, bias - mean * scale};
}

template <typename T>
NEPTUNE_HD T bn_pre_activation(T x, BnAffine<T> a) {
  return x * a.scale + a.shift;
}

// ReLU with torch's conventions: NaN propagates, and the gradient mask is z > 0
// (torch's threshold_backward on the result), so z = 0 and NaN get no gradient.
template <typename T>
NEPTUNE_HD T relu_value(T z) {
  return z < T(0) ? T(0) : z;
}

template <typename T>
NEPTUNE_HD bool relu_passes(T z) {
  return z > T(0);
}

// Chan et al.'s pairwise merge of (count, mean, M2 = sum of squared deviations):
// lets every fixed-size piece of a channel be reduced on its own (two passes
// over data that sits in cache) and the pieces be merged in a fixed order, so
// the statistics are accurate and do not depend on the number of threads.
template <typename T>
NEPTUNE_HD void chan_merge(T& n_a, T& mean_a, T& m2_a, T n_b, T mean_b, T m2_b) {
  if (n_b == T(0)) return;
  const T n = n_a + n_b;
  const T delta = mean_b - mean_a;
  const T w_b = n_b / n;
  mean_a = mean_a + delta * w_b;
  m2_a = m2_a + m2_b + delta * delta * n_a * w_b;
  n_a = n;
}

// Backward of y = relu(bn(x)) with batch statistics, over the M = N*H*W
// positions of a channel. With dz = grad_y * [z > 0] and x_hat = (x - mean) * invstd:
//   grad_bias   = sum dz
//   grad_weight = sum dz * x_hat = invstd * sum dz * (x - mean)
//   grad_x      = weight * invstd * (dz - grad_bias / M - x_hat * grad_weight / M)
//               = dz * k_dz + (x - mean) * k_xmu + k_0
// Positions with z <= 0 have dz = 0 and add nothing to the sums, but their
// grad_x is NOT zero (k_0 + (x - mean) * k_xmu): it needs x there.
template <typename T>
struct BnReluGradCoef {
  T k_dz, k_xmu, k_0;
};

template <typename T>
NEPTUNE_HD BnReluGradCoef<T> bn_relu_grad_coef(T weight, T invstd, T sum_dz, T sum_dz_xmu, T count) {
  const T a = weight * invstd;
  const T mean_dz = sum_dz / count;
  const T proj = sum_dz_xmu * invstd * invstd / count;
  return {a, -a * proj, -a * mean_dz};
}

template <typename T>
NEPTUNE_HD T bn_relu_grad_x(T dz, T xmu, BnReluGradCoef<T> k) {
  return dz * k.k_dz + xmu * k.k_xmu + k.k_0;
}

}  // namespace neptune
