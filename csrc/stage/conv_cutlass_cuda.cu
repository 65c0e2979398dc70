// neptune::conv_bias_act on CUDA: argument checks, output allocation and the stream for
// the CUTLASS kernels of conv_cutlass_kernels_cuda.cu (see conv_cutlass.h). Built only
// with the CUTLASS headers (NEPTUNE_WITH_CUTLASS).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "conv_cutlass.h"
#include "stage.h"

namespace neptune {

namespace {

int64_t out_size(int64_t in, int64_t k, int64_t pad, int64_t stride, int64_t dil) {
  return (in + 2 * pad - dil * (k - 1) - 1) / stride + 1;
}

}  // namespace

at::Tensor conv_bias_act_cuda(const at::Tensor& input, const at::Tensor& weight,
                              const at::Tensor& bias, const std::optional<at::Tensor>& residual,
                              at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t activation) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  TORCH_CHECK(input.is_cuda() && weight.is_cuda() && bias.is_cuda(),
              "neptune::conv_bias_act: input, weight and bias must be CUDA tensors");
  TORCH_CHECK(input.device() == weight.device() && input.device() == bias.device(),
              "neptune::conv_bias_act: input, weight and bias must be on one device");
  TORCH_CHECK(input.dim() == 4 && weight.dim() == 4,
              "neptune::conv_bias_act: input [N, C, H, W] and weight [K, C, R, S] expected, got ",
              input.sizes(), " and ", weight.sizes());
  const auto dt = input.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16,
              "neptune::conv_bias_act: input must be float16 or bfloat16, got ", dt);
  TORCH_CHECK(weight.scalar_type() == dt && bias.scalar_type() == dt,
              "neptune::conv_bias_act: weight and bias must have the input's dtype ", dt);
  TORCH_CHECK(input.is_contiguous(cl),
              "neptune::conv_bias_act: input must be channels_last-contiguous");
  TORCH_CHECK(weight.size(1) == input.size(1),
              "neptune::conv_bias_act: weight has ", weight.size(1), " input channels, input has ",
              input.size(1), " (groups are not supported)");
  const int64_t K = weight.size(0);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == K, "neptune::conv_bias_act: bias must be [",
              K, "], got ", bias.sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "neptune::conv_bias_act: stride, padding and dilation must have 2 values each");
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0 && dilation[0] > 0 && dilation[1] > 0 &&
                  padding[0] >= 0 && padding[1] >= 0,
              "neptune::conv_bias_act: stride and dilation must be positive, padding non-negative");
  TORCH_CHECK(activation == 0 || activation == 1,
              "neptune::conv_bias_act: activation must be 0 (none) or 1 (ReLU), got ", activation);
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t R = weight.size(2), S = weight.size(3);
  const int64_t P = out_size(H, R, padding[0], stride[0], dilation[0]);
  const int64_t Q = out_size(W, S, padding[1], stride[1], dilation[1]);
  TORCH_CHECK(P > 0 && Q > 0, "neptune::conv_bias_act: the output would be empty (", P, "x", Q, ")");
  TORCH_CHECK(N * std::max(H * W * C, P * Q * K) < (int64_t(1) << 31),
              "neptune::conv_bias_act: tensors of 2**31 or more elements are not supported");
  at::Tensor out = at::empty({N, K, P, Q}, input.options().memory_format(cl));
  at::Tensor w = weight.contiguous(cl);  // KRSC
  at::Tensor b = bias.contiguous();
  at::Tensor r;
  if (residual.has_value()) {
    r = *residual;
    TORCH_CHECK(r.device() == input.device() && r.scalar_type() == dt,
                "neptune::conv_bias_act: residual must have the input's device and dtype");
    TORCH_CHECK(r.sizes() == out.sizes(), "neptune::conv_bias_act: residual must be ",
                out.sizes(), ", got ", r.sizes());
    TORCH_CHECK(activation == 1, "neptune::conv_bias_act: a residual needs activation 1 (ReLU)");
    r = r.contiguous(cl);
  }
  if (out.numel() == 0) return out;
  cutlass_conv::Problem p{};
  p.dtype = dt == at::kHalf ? cutlass_conv::DType::kHalf : cutlass_conv::DType::kBFloat16;
  p.activation = activation == 1 ? cutlass_conv::Activation::kReLU : cutlass_conv::Activation::kNone;
  p.N = N, p.H = H, p.W = W, p.C = C, p.K = K, p.R = R, p.S = S, p.P = P, p.Q = Q;
  p.pad_h = padding[0], p.pad_w = padding[1], p.stride_h = stride[0], p.stride_w = stride[1];
  p.dilation_h = dilation[0], p.dilation_w = dilation[1];
  p.input = input.data_ptr(), p.filter = w.data_ptr(), p.bias = b.data_ptr();
  p.residual = residual.has_value() ? r.data_ptr() : nullptr;
  p.output = out.data_ptr();
  c10::cuda::CUDAGuard guard(input.device());
  const int status = cutlass_conv::run(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == 0, "neptune::conv_bias_act: CUTLASS cannot run this convolution (status ",
              status, "; channels must be multiples of 8)");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace neptune
