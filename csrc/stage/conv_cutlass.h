// Implicit-GEMM convolution with the Stage's epilogue, on NVIDIA's CUTLASS templates
// (conv_cutlass_kernels_cuda.cu; built only when the CUTLASS headers are found, see
// setup.py). The entry (conv_cutlass_cuda.cu) checks its arguments and falls back to
// nothing: a shape the kernels cannot take is an error the Python side avoids
// (neptune_ext/stage/eval.py asks cutlass_conv_supported first).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace neptune {
namespace cutlass_conv {

enum class DType : int { kHalf = 0, kBFloat16 = 1 };
enum class Activation : int { kNone = 0, kReLU = 1 };

// One convolution: NHWC input [N, H, W, C], KRSC filter [K, R, S, C], NPQK output,
// output = activation(conv(input, filter) + bias[k] (+ residual[n, p, q, k])).
struct Problem {
  DType dtype;
  Activation activation;
  int N, H, W, C, K, R, S, P, Q;
  int pad_h, pad_w, stride_h, stride_w, dilation_h, dilation_w;
  const void* input;
  const void* filter;
  const void* bias;      // [K], the input's dtype
  const void* residual;  // NPQK or nullptr
  void* output;          // NPQK
};

// 0 on success; otherwise a CUTLASS status code (cutlass::Status) or -1 for a
// combination no kernel was instantiated for (residual without ReLU).
int run(const Problem& p, cudaStream_t stream);

// Whether run() can take this problem (alignment, dtype, epilogue), without running it.
bool supported(const Problem& p);

}  // namespace cutlass_conv
}  // namespace neptune
