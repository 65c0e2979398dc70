// The CPU attention kernels' channel math, in the accumulation type: the softmax's exp
// (exp_acc) and its branch-free online step for a vector loop over the heads, the dot
// products of a head or of every head at once, and the rescaled accumulation. Loops written
// for GCC to vectorize (`omp simd`; the setup's -fno-trapping-math lets it if-convert selects).
#pragma once

#include <ATen/OpMathType.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace neptune {

// e^x for the CPU kernels' softmax weights, in the accumulation type. double: std::exp.
// float: a polynomial written to vectorize inside `omp simd` loops (libm's expf is a call,
// which stops them): x = n ln2 + r with |r| <= ln2 / 2 (Cody-Waite, two constants),
// e^r by Cephes' degree-6 polynomial, 2^n from the exponent bits. Within 1.02 ulp of the
// exact value for every float in [-86.5, 88.72] (checked exhaustively, with and without
// fused multiply-adds: 0.99 and 1.01 ulp at most); below
// -86.5 it is 0 (under 3e-38: the float subnormals, a weight of nothing next to the row's
// largest, which is 1), -inf gives 0, above 88.72 and +inf give +inf, NaN stays NaN.
// Branch-free, the edge cases by bit masks: a select would be a branch GCC cannot vectorize
// (the setup's -fno-trapping-math lets it if-convert the kernels' own selects).
template <typename T>
inline T exp_acc(T x) {
  return std::exp(x);
}

template <>
__attribute__((always_inline)) inline float exp_acc(float x) {
  const float lo = -86.5f, hi = 88.72f;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer (|x| < 2^22)
  const float t = x * 1.44269504088896341f + magic;
  const uint32_t tb = __builtin_bit_cast(uint32_t, t);
  const float n = t - magic;  // round(x / ln 2)
  float r = x - n * 0.693359375f;  // ln 2 = 0.693359375 - 2.12194440e-4 (+ ...)
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  // 2^(n - 1) (n in [-125, 128] for x in range: a normal float), times 2 below
  const float half_scale = __builtin_bit_cast(float, (tb - 0x4B400000u + 126u) << 23);
  const uint32_t bits = __builtin_bit_cast(uint32_t, y * half_scale * 2.0f);
  const uint32_t under = 0u - static_cast<uint32_t>(x < lo);  // all ones: 0
  const uint32_t over = 0u - static_cast<uint32_t>(x > hi);   // all ones: +inf
  return __builtin_bit_cast(float, (bits & ~under & ~over) | (over & 0x7f800000u));
}

// online_softmax_step (attention_math.h) without a branch, for a vector loop over the heads:
// the same rules for infinite and NaN logits, one exp (exp_acc) instead of one of two:
// exp(-|x - m|) is the rescale when x is the new max, else the weight.
template <typename T>
inline void online_softmax_lane(T x, T& m, T& s, T& rescale, T& weight) {
  const T inf = std::numeric_limits<T>::infinity();
  const bool gt = x > m;
  const T d = x - m;
  const T e = exp_acc(gt ? -d : d);  // (m = -inf before the first edge: rescale 0)
  const bool masked = x == -inf && m == -inf;  // only masked logits so far: weight 0
  rescale = gt ? e : T(1);
  weight = gt ? (x - x) + T(1) : (masked ? T(0) : e);  // (x - x) + 1: NaN for x = +inf
  s = s * rescale + weight;
  m = gt ? x : m;
}

// <a, b> over C channels in the accumulation type.
template <typename acc_t, typename A, typename B>
inline acc_t dot_channels(const A* a, const B* b, int64_t C) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < C; ++c) s += static_cast<acc_t>(a[c]) * static_cast<acc_t>(b[c]);
  return s;
}

// dots[k] = <a_k, b_k> for the H heads of C channels each (a, b: rows of H * C values) in the
// accumulation type. float with C a multiple of 8 (GCC): per head the products summed in 8
// lanes, then every 8 heads' lanes summed by a 3-level transpose tree into one vector of their
// 8 dots - no per-head horizontal sum, which costs more than the products when C is small.
// Otherwise (and for the heads past a multiple of 8), dot_channels per head.
template <typename acc_t, typename A, typename B>
inline void head_dots(const A* a, const B* b, int64_t H, int64_t C, acc_t* dots) {
  int64_t k0 = 0;
#if defined(__GNUC__) && !defined(__clang__)
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<A, float> && std::is_same_v<B, float>) {
    if (C % 8 == 0) {
      typedef float v8f __attribute__((vector_size(32)));
      typedef int v8i __attribute__((vector_size(32)));
      const v8i even = {0, 2, 4, 6, 8, 10, 12, 14}, odd = {1, 3, 5, 7, 9, 11, 13, 15};
      // x's 4 pair sums, then y's (by reference: a vector by value is an ABI the baseline
      // build warns about)
      auto pair_sums = [&](const v8f& x, const v8f& y, v8f& out) {
        out = __builtin_shuffle(x, y, even) + __builtin_shuffle(x, y, odd);
      };
      for (; k0 + 8 <= H; k0 += 8) {
        v8f p[8];
        for (int q = 0; q < 8; ++q) {
          const float* x = a + (k0 + q) * C;
          const float* y = b + (k0 + q) * C;
          v8f u, v;
          std::memcpy(&u, x, sizeof(u));
          std::memcpy(&v, y, sizeof(v));
          v8f acc = u * v;
          for (int64_t c = 8; c < C; c += 8) {
            std::memcpy(&u, x + c, sizeof(u));
            std::memcpy(&v, y + c, sizeof(v));
            acc += u * v;
          }
          p[q] = acc;
        }
        v8f u[4], w[2], z;
        for (int q = 0; q < 4; ++q) pair_sums(p[2 * q], p[2 * q + 1], u[q]);
        pair_sums(u[0], u[1], w[0]);
        pair_sums(u[2], u[3], w[1]);
        pair_sums(w[0], w[1], z);  // head k0 + q's dot in lane q
        std::memcpy(dots + k0, &z, sizeof(z));
      }
    }
  }
#endif
  for (; k0 < H; ++k0) dots[k0] = dot_channels<acc_t>(a + k0 * C, b + k0 * C, C);
}

// acc = acc * rescale + w * (v (+ e)) over C channels (e: an optional second addend).
template <typename scalar_t, typename acc_t>
inline void axpy_rescaled(acc_t* acc, acc_t rescale, acc_t w, const scalar_t* v, const scalar_t* e,
                          int64_t C) {
  if (e) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c)
      acc[c] = acc[c] * rescale + w * (static_cast<acc_t>(v[c]) + static_cast<acc_t>(e[c]));
  } else if (rescale != acc_t(1)) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) acc[c] = acc[c] * rescale + w * static_cast<acc_t>(v[c]);
  } else {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) acc[c] += w * static_cast<acc_t>(v[c]);
  }
}

// dst[c] = src[c] * scale over n values, into the accumulation type.
template <typename scalar_t, typename acc_t>
inline void load_scaled(acc_t* dst, const scalar_t* src, acc_t scale, int64_t n) {
  for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<acc_t>(src[c]) * scale;
}

// D_i = <dOut_i, out_i> per head: the softmax backward's row term (H values).
template <typename scalar_t, typename acc_t>
inline void row_dots(const scalar_t* go, const scalar_t* out, int64_t H, int64_t C, acc_t* D) {
  for (int64_t h = 0; h < H; ++h) D[h] = dot_channels<acc_t>(go + h * C, out + h * C, C);
}

}  // namespace neptune
