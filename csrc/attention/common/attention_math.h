// Math shared by the CPU and CUDA graph-attention kernels.
//
// Everything here is __host__ __device__ so both back ends compute the same
// logits, the same online-softmax updates and the same dropout masks; the
// pure-PyTorch reference (neptune_ext/attention/reference.py) mirrors the RNG bit for bit.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define NEPTUNE_HD __host__ __device__ __forceinline__
#else
#define NEPTUNE_HD inline
#endif

namespace neptune {

// Both branches are computed, then one is selected: a select the CPU compiler turns
// into a vector blend (a conditional multiply is a branch it cannot vectorize). GCC
// if-converts it only without -ftrapping-math (its default): the setup passes
// -fno-trapping-math.
template <typename T>
NEPTUNE_HD T leaky_relu(T x, T slope) {
  const T neg = x * slope;
  return x > T(0) ? x : neg;
}

// d LeakyReLU(x) / dx, with torch's convention at 0 (the negative branch).
template <typename T>
NEPTUNE_HD T leaky_relu_grad(T x, T slope) {
  return x > T(0) ? T(1) : slope;
}

// Gradient of the logit of edge (i, j):
//   dS_ij = (a'_ij <dOut_i, h_j> - a_ij D_i) * LeakyReLU'(raw_ij),
// with a the softmax weight, a' the weight after dropout, g = <dOut_i, h_j> and
// D_i = <dOut_i, out_i>.
template <typename T>
NEPTUNE_HD T logit_grad(T a_kept, T g, T a, T D, T raw, T slope) {
  return (a_kept * g - a * D) * leaky_relu_grad(raw, slope);
}

// The factor applied to kept attention weights: 1 / (1 - p), or 1 without dropout.
template <typename T>
inline T dropout_keep_scale(double p) {
  return p > 0.0 ? T(1) / (T(1) - static_cast<T>(p)) : T(1);
}

// MurmurHash3's 32-bit finalizer: a bijection with good avalanche.
NEPTUNE_HD uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85ebca6bu;
  x ^= x >> 13;
  x *= 0xc2b2ae35u;
  x ^= x >> 16;
  return x;
}

// Counter-based dropout: the keep/drop decision of (edge, head) is a pure
// function of (seed, edge, head), so backward regenerates the mask instead of
// storing it, and CPU, CUDA and the reference agree. `edge` is the caller's
// edge id (not the CSR position), so the mask does not depend on the layout.
NEPTUNE_HD uint32_t dropout_bits(uint64_t seed, int64_t edge, int64_t head) {
  const uint32_t s = fmix32(static_cast<uint32_t>(seed) ^
                            fmix32(static_cast<uint32_t>(seed >> 32) + 0x632be5abu));
  const uint64_t e = static_cast<uint64_t>(edge);
  uint32_t x = fmix32(static_cast<uint32_t>(e >> 32) +
                      static_cast<uint32_t>(head) * 0x9e3779b9u);
  x = fmix32(x ^ static_cast<uint32_t>(e));
  return fmix32(x ^ s);
}

// Uniform in [0, 1) with 24 bits; the edge is kept when u >= p.
NEPTUNE_HD bool dropout_keep(uint64_t seed, int64_t edge, int64_t head, float p) {
  const float u = static_cast<float>(dropout_bits(seed, edge, head) >> 8) *
                  (1.0f / 16777216.0f);
  return u >= p;
}

// One step of the online softmax (running max m, running sum s). Returns the
// factor by which the accumulator must be rescaled and the weight of the new
// element relative to the (possibly new) max. Infinite logits follow PyTorch's
// softmax: a -inf logit gets weight 0 (a mask; a row whose logits are all -inf
// ends with s = 0 and gets 0, like a row without in-edges), a +inf logit makes
// the row NaN (exp(inf - inf)), and a NaN logit propagates.
template <typename T>
NEPTUNE_HD void online_softmax_step(T x, T& m, T& s, T& rescale, T& weight) {
  if (x > m) {
    rescale = exp(m - x);  // exp(-inf) = 0 on the first element
    weight = (x - x) + T(1);  // 1, or NaN for x = +inf
    s = s * rescale + weight;
    m = x;
  } else {
    rescale = T(1);
    // exp(x - m), except x = m = -inf (only masked logits so far), where it would be
    // exp(NaN): weight 0. (m * 0 is NaN only for an infinite m.)
    const bool masked = x == m && m < T(0) && m * T(0) != m * T(0);
    weight = masked ? T(0) : exp(x - m);
    s += weight;
  }
}

// True when a finished softmax row has mass: s > 0, or NaN (which must propagate).
template <typename T>
NEPTUNE_HD bool softmax_has_mass(T s) {
  return !(s <= T(0));
}

// Merge two partial softmax states (m1, s1) and (m2, s2): returns the scale
// factors to apply to the two accumulators.
template <typename T>
NEPTUNE_HD void online_softmax_merge(T m1, T s1, T m2, T s2, T& m, T& s, T& f1,
                                     T& f2) {
  m = m1 > m2 ? m1 : m2;
  f1 = s1 > T(0) ? exp(m1 - m) : T(0);
  f2 = s2 > T(0) ? exp(m2 - m) : T(0);
  s = s1 * f1 + s2 * f2;
}

}  // namespace neptune
