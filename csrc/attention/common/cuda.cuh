// What every CUDA attention kernel shares: the launch (or, under tests/cuda_emulation,
// the CPU emulation), the block size, output allocation, and the device helpers
// (exp/log in the accumulation type, 16-byte vector loads and stores).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#ifdef NEPTUNE_CUDA_EMULATION
// tests/cuda_emulation: the same kernels run on the CPU, lanes as fibers (a test
// harness for machines without a GPU; never part of the package build).
#include "cuda_emulation.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define NEPTUNE_LAUNCH(kernel, grid, stream, ...)                 \
  do {                                                            \
    kernel<<<(grid), kBlock, 0, (stream)>>>(__VA_ARGS__);         \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                               \
  } while (0)
#define NEPTUNE_CHECK_ALIGNED(ptr, bytes) ((void)0)
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "attention/common/attention.h"
#include "attention/common/attention_math.h"
namespace neptune {
namespace {

constexpr int kBlock = 256;             // threads per block (a multiple of 32)

int pow2ceil(int64_t x) {
  int p = 1;
  while (p < x && p < 32) p <<= 1;
  return p;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Outputs and scratch. The CPU emulation fills them with NaN, so an element that
// no thread writes, or a record read before it is written, shows in the results.
at::Tensor new_tensor(at::IntArrayRef size, const at::TensorOptions& opts) {
#ifdef NEPTUNE_CUDA_EMULATION
  return at::full(size, std::numeric_limits<double>::quiet_NaN(), opts);
#else
  return at::empty(size, opts);
#endif
}

// ----------------------------------------------------------------------------
// Device helpers.

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
__device__ __forceinline__ float acc_exp(float x) { return ::expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return ::exp(x); }
__device__ __forceinline__ float acc_log(float x) { return ::logf(x); }
__device__ __forceinline__ double acc_log(double x) { return ::log(x); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// N consecutive elements: one 16-byte access when N * sizeof(T) == 16. Kept in
// the input type until used (half the registers for fp16/bf16).
template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  NEPTUNE_CHECK_ALIGNED(p, sizeof(Vec<T, N>));
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> zero_vec() {
  Vec<T, N> r;
#pragma unroll
  for (int v = 0; v < N; ++v) r.v[v] = T(0);
  return r;
}

template <typename T, int N, typename A>
__device__ __forceinline__ void store_vec(T* p, const A (&x)[N], A scale) {
  NEPTUNE_CHECK_ALIGNED(p, sizeof(Vec<T, N>));
  Vec<T, N> r;
#pragma unroll
  for (int v = 0; v < N; ++v) r.v[v] = static_cast<T>(x[v] * scale);
  if constexpr (sizeof(r) == 16) {
    // Spelled out: nvcc turned the struct store into four 4-byte stores here.
    uint32_t w[4];
    memcpy(w, &r, sizeof(w));
#ifdef NEPTUNE_CUDA_EMULATION
    memcpy(p, w, sizeof(w));
#else
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w[0]), "r"(w[1]),
                 "r"(w[2]), "r"(w[3])
                 : "memory");
#endif
  } else {
    *reinterpret_cast<Vec<T, N>*>(p) = r;
  }
}

// Elements per 16-byte vector; fp64 uses scalars (it is there for gradcheck).
template <typename scalar_t>
constexpr int vec_width() {
  return sizeof(scalar_t) >= 8 ? 1 : static_cast<int>(16 / sizeof(scalar_t));
}

}  // namespace
}  // namespace neptune
