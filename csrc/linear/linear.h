// A dense projection y = x W^T (+ b) for the layers' node projections, on the CPU.
//
// Same numbers as torch's Linear (float32 rounding, another summation order); faster where
// the GEMM library torch's addmm/mm use is not the fastest one on the machine: when the
// build has oneDNN (torch.backends.mkldnn), the caller allows it (onednn) and the product is
// large enough, float32 GEMMs run through oneDNN's matmul (mkldnn::_linear_pointwise, the op
// torch's own CPU inductor and mkldnn fusions call), else through the addmm/mm torch's
// Linear calls - then the numbers are the Linear's to the bit. Either way the output (and in
// backward the input's gradient) of a large product comes from empty_cpu's cache of freed
// buffers (memory/cpu_alloc.h): on a large graph a projection's output is tens of MB, and a
// fresh one costs its size in page faults every step (a quarter of the GEMM's own time). The
// choice depends only on the dtype, the shapes and the flag, never on values. Backward is
// one op call (neptune::linear_backward); a backward with create_graph=True is computed with
// differentiable ATen matmuls instead, so double backward stays exact.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>

namespace neptune {

// onednn=false: always torch's own GEMM (the numbers of torch's Linear, to the bit).
at::Tensor linear_cpu(const at::Tensor& input, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, bool onednn);

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& input,
    const std::optional<at::Tensor>& weight, std::array<bool, 3> output_mask, bool onednn);

// Whether the layers should take this op on this machine's CPU: oneDNN's float32 matmul
// beat torch's (MKL) GEMMs for the layers' projections on an AMD EPYC (1.2-1.8x) and lost to
// them on an Intel Xeon (0.85x); so true on AMD x86 CPUs, false elsewhere (other CPUs are
// unmeasured: torch's Linear stays). A property of the CPU, never of values.
bool linear_prefers_onednn();

}  // namespace neptune
