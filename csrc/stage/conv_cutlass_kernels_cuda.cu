// The CUTLASS kernels behind conv_cutlass.h: implicit-GEMM forward convolution (NHWC,
// tensor cores, float32 accumulation) with the epilogue fused:
//   no residual:  D = act(acc + bias)             (bias read as a C tensor whose N, H, W
//                                                  strides are 0: one value per channel)
//   residual:     D = relu((acc + bias) + residual) (CUTLASS's residual-block epilogue,
//                                                  bias as its broadcast vector)
// Instantiated for half and bfloat16 with the SM80 tensor-op mainloop (it runs on SM90
// too). Three epilogues x two dtypes: each instantiation costs compile minutes, so no
// more of them. This file includes no ATen header.
#include "conv_cutlass.h"

#include "cutlass/cutlass.h"
#include "cutlass/conv/conv2d_problem_size.h"
#include "cutlass/conv/device/implicit_gemm_convolution.h"
#include "cutlass/conv/kernel/default_conv2d_fprop.h"
#include "cutlass/conv/kernel/default_conv2d_fprop_with_broadcast.h"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/epilogue/thread/linear_combination_relu.h"
#include "cutlass/epilogue/thread/linear_combination_residual_block.h"
#include "cutlass/functional.h"
#include "cutlass/numeric_types.h"

namespace neptune {
namespace cutlass_conv {
namespace {

using Layout = cutlass::layout::TensorNHWC;
using ThreadblockShape = cutlass::gemm::GemmShape<128, 128, 64>;
using WarpShape = cutlass::gemm::GemmShape<64, 64, 64>;
using InstructionShape = cutlass::gemm::GemmShape<16, 8, 16>;
using Swizzle = cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>;
constexpr int kStages = 3;

template <typename T>
constexpr int kVector = 128 / cutlass::sizeof_bits<T>::value;  // 8 for 16-bit types

template <typename T, typename EpilogueOp>
using BiasConv = cutlass::conv::device::ImplicitGemmConvolution<
    typename cutlass::conv::kernel::DefaultConv2dFprop<
        T, Layout, T, Layout, T, Layout, float, cutlass::arch::OpClassTensorOp,
        cutlass::arch::Sm80, ThreadblockShape, WarpShape, InstructionShape, EpilogueOp, Swizzle,
        kStages, cutlass::arch::OpMultiplyAdd,
        cutlass::conv::IteratorAlgorithm::kOptimized>::Kernel>;

template <typename T>
using ReluEpilogue = cutlass::epilogue::thread::LinearCombinationRelu<
    T, kVector<T>, float, float, cutlass::epilogue::thread::ScaleType::NoBetaScaling>;

template <typename T>
using IdentityEpilogue = cutlass::epilogue::thread::LinearCombination<
    T, kVector<T>, float, float, cutlass::epilogue::thread::ScaleType::NoBetaScaling>;

template <typename T>
using ResidualEpilogue = cutlass::epilogue::thread::LinearCombinationResidualBlock<
    T, float, float, T, kVector<T>, cutlass::epilogue::thread::Identity, cutlass::plus,
    cutlass::epilogue::thread::ReLu>;

template <typename T>
using ResidualConv = cutlass::conv::device::ImplicitGemmConvolution<
    typename cutlass::conv::kernel::DefaultConv2dFpropWithBroadcast<
        T, Layout, T, Layout, T, Layout, float, cutlass::arch::OpClassTensorOp,
        cutlass::arch::Sm80, ThreadblockShape, WarpShape, InstructionShape, ResidualEpilogue<T>,
        Swizzle, kStages, cutlass::arch::OpMultiplyAdd,
        cutlass::conv::IteratorAlgorithm::kOptimized>::Kernel>;

cutlass::conv::Conv2dProblemSize problem_size(const Problem& p) {
  return cutlass::conv::Conv2dProblemSize(
      {p.N, p.H, p.W, p.C}, {p.K, p.R, p.S, p.C}, {p.pad_h, p.pad_h, p.pad_w, p.pad_w},
      {p.stride_h, p.stride_w}, {p.dilation_h, p.dilation_w}, {p.N, p.P, p.Q, p.K},
      cutlass::conv::Mode::kCrossCorrelation, /*split_k_slices=*/1);
}

template <typename T>
Layout packed(int n, int h, int w, int c) {
  return Layout::packed({n, h, w, c});
}

// The bias as an NPQK tensor with zero strides for N, P and Q: element (n, p, q, k) = bias[k].
template <typename T>
cutlass::TensorRef<T, Layout> bias_ref(const Problem& p) {
  return {static_cast<T*>(const_cast<void*>(p.bias)), Layout(cutlass::make_Coord(0, 0, 0))};
}

template <typename T, typename Conv, typename Args>
int launch(const Args& args, bool dry_run, cudaStream_t stream) {
  Conv conv;
  cutlass::Status status = conv.can_implement(args);
  if (status != cutlass::Status::kSuccess || dry_run) {
    return static_cast<int>(status);
  }
  // split_k_slices = 1: no workspace.
  status = conv.initialize(args, nullptr, stream);
  if (status != cutlass::Status::kSuccess) return static_cast<int>(status);
  status = conv(stream);
  return static_cast<int>(status);
}

template <typename T>
int dispatch(const Problem& p, bool dry_run, cudaStream_t stream) {
  const auto size = problem_size(p);
  cutlass::TensorRef<T, Layout> a(static_cast<T*>(const_cast<void*>(p.input)),
                                  packed<T>(p.N, p.H, p.W, p.C));
  cutlass::TensorRef<T, Layout> b(static_cast<T*>(const_cast<void*>(p.filter)),
                                  packed<T>(p.K, p.R, p.S, p.C));
  cutlass::TensorRef<T, Layout> d(static_cast<T*>(p.output), packed<T>(p.N, p.P, p.Q, p.K));
  if (p.residual != nullptr) {
    if (p.activation != Activation::kReLU) return -1;
    using Conv = ResidualConv<T>;
    cutlass::TensorRef<T, Layout> c(static_cast<T*>(const_cast<void*>(p.residual)),
                                    packed<T>(p.N, p.P, p.Q, p.K));
    typename Conv::Arguments args(size, a, b, c, d, {1.0f, 1.0f},
                                  cutlass::conv::SplitKMode::kSerial,
                                  const_cast<void*>(p.bias), nullptr, 0, 0);
    return launch<T, Conv>(args, dry_run, stream);
  }
  if (p.activation == Activation::kReLU) {
    using Conv = BiasConv<T, ReluEpilogue<T>>;
    typename Conv::Arguments args(size, a, b, bias_ref<T>(p), d, {1.0f});
    return launch<T, Conv>(args, dry_run, stream);
  }
  using Conv = BiasConv<T, IdentityEpilogue<T>>;
  typename Conv::Arguments args(size, a, b, bias_ref<T>(p), d, {1.0f});
  return launch<T, Conv>(args, dry_run, stream);
}

int run_or_check(const Problem& p, bool dry_run, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kHalf:
      return dispatch<cutlass::half_t>(p, dry_run, stream);
    case DType::kBFloat16:
      return dispatch<cutlass::bfloat16_t>(p, dry_run, stream);
  }
  return -1;
}

}  // namespace

int run(const Problem& p, cudaStream_t stream) { return run_or_check(p, false, stream); }

bool supported(const Problem& p) { return run_or_check(p, true, nullptr) == 0; }

}  // namespace cutlass_conv
}  // namespace neptune
