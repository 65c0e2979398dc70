// Stage (Conv -> BatchNorm -> ReLU) kernels: declarations and argument checks
// (the schemas are in neptune.cpp).
//
// The convolution itself runs in ATen/oneDNN (F.conv2d, and oneDNN's fused
// conv+bias+ReLU in eval); what is ours is the training-mode BatchNorm+ReLU:
//
//   bn_relu_forward(x, weight, bias, eps) -> (y, mean, var, invstd)
//       y = relu(weight * (x - mean) * invstd + bias) with batch statistics of
//       x [N, C, H, W] over (N, H, W); var is the biased variance, invstd =
//       1 / sqrt(var + eps). mean/var/invstd are [C] in float32 (float64 for
//       float64 x). Functional: running statistics are updated by the caller.
//   bn_relu_backward(grad_y, x, weight, bias, mean, invstd)
//       -> (grad_x, grad_weight, grad_bias)
//       the exact gradient; the ReLU mask is recomputed from x (see
//       stage_math.h for why x, and not only y, is needed).
//
// Python (neptune_ext/stage/functional.py) validates inputs with friendly messages; the
// TORCH_CHECKs here are the last line of defence for direct torch.ops callers.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <tuple>

#include "common.h"

namespace neptune {

inline void check_bn_relu_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& bias) {
  TORCH_CHECK(x.dim() == 4, "neptune::", op, ": x must be [N, C, H, W], got ", x.sizes());
  const auto C = x.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == C, "neptune::", op,
              ": weight must be [C] = [", C, "], got ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == C, "neptune::", op,
              ": bias must be [C] = [", C, "], got ", bias.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) && at::isFloatingType(weight.scalar_type()) &&
                  at::isFloatingType(bias.scalar_type()),
              "neptune::", op, ": x, weight and bias must be floating point");
  TORCH_CHECK(x.numel() > 0 && x.numel() / C > 0, "neptune::", op,
              ": x must have at least one value per channel, got ", x.sizes());
}

inline void check_bn_relu_backward_inputs(const at::Tensor& grad_y, const at::Tensor& x,
                                          const at::Tensor& weight, const at::Tensor& bias,
                                          const at::Tensor& mean, const at::Tensor& invstd) {
  check_bn_relu_inputs("bn_relu_backward", x, weight, bias);
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(),
              "neptune::bn_relu_backward: grad_y must match x in shape and dtype, got ",
              grad_y.sizes(), " ", grad_y.scalar_type(), " vs ", x.sizes(), " ", x.scalar_type());
  const auto C = x.size(1);
  TORCH_CHECK(mean.dim() == 1 && mean.size(0) == C && invstd.dim() == 1 && invstd.size(0) == C,
              "neptune::bn_relu_backward: mean and invstd must be [C] = [", C, "]");
}

// The backward's tensors as both devices' kernels read them, after the checks: x dense
// (channels_last kept), grad_y in x's layout, weight, bias, mean and invstd in the
// accumulation type, and grad_x, grad_weight, grad_bias allocated (the last two in the
// accumulation type). Returns (x, gy, w, b, mu, rs, gx, gw, gb).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                  at::Tensor, at::Tensor, at::Tensor>
bn_relu_backward_operands(const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& weight,
                          const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& invstd) {
  check_bn_relu_backward_inputs(grad_y, x_in, weight, bias, mean, invstd);
  const auto acc = acc_dtype(x_in.scalar_type());
  const at::Tensor x = dense(x_in);
  const int64_t C = x.size(1);
  return {x,
          grad_y.contiguous(use_channels_last(x) ? at::MemoryFormat::ChannelsLast
                                                 : at::MemoryFormat::Contiguous),
          weight.to(acc).contiguous(), bias.to(acc).contiguous(), mean.to(acc).contiguous(),
          invstd.to(acc).contiguous(), at::empty_like(x), at::empty({C}, x.options().dtype(acc)),
          at::empty({C}, x.options().dtype(acc))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& invstd);

// CUDA (stage_cuda.cu; built with NEPTUNE_WITH_CUDA): same semantics as the CPU.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_forward_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& invstd);

// Evaluation convolution with the Stage's epilogue: activation(conv(input, weight) + bias
// (+ residual)), activation 0 = none, 1 = ReLU (conv_cutlass_cuda.cu, CUTLASS kernels;
// NEPTUNE_WITH_CUTLASS builds only). float16/bfloat16, channels_last, groups 1.
at::Tensor conv_bias_act_cuda(const at::Tensor& input, const at::Tensor& weight,
                              const at::Tensor& bias, const std::optional<at::Tensor>& residual,
                              at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t activation);

// Elsewhere: a clear error instead of the dispatcher's "no kernel" (CPU, or CUDA builds
// without CUTLASS).
at::Tensor conv_bias_act_unavailable(const at::Tensor& input, const at::Tensor& weight,
                                     const at::Tensor& bias,
                                     const std::optional<at::Tensor>& residual,
                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, int64_t activation);

}  // namespace neptune
