// The CUDA graph-attention kernels compiled as C++ against cuda_emulation.h, and
// registered as torch.ops.<NEPTUNE_EMU_NS>.gat_forward / gat_backward (and the gatv2_ /
// transformer_ pairs) on CPU tensors. Built by tests/cuda_emulation/build.py, for tests only.
#ifndef NEPTUNE_CUDA_EMULATION
#define NEPTUNE_CUDA_EMULATION 1
#endif
#include "attention/gat/gat_fwd_cuda.cu"
#include "attention/gat/gat_bwd_cuda.cu"
#include "attention/gatv2/gatv2_fwd_cuda.cu"
#include "attention/gatv2/gatv2_bwd_cuda.cu"
#include "attention/transformer/transformer_fwd_cuda.cu"
#include "attention/transformer/transformer_bwd_cuda.cu"
// The graph checks every kernel entry runs (and the counting sort build_csr uses).
#include "graph/graph.cpp"
#include "graph/graph_cpu.cpp"
#include "memory/cpu_alloc.cpp"  // graph_cpu.cpp's large buffers

#include <torch/library.h>

TORCH_LIBRARY(NEPTUNE_EMU_NS, m) {
  m.def("gat_forward", &neptune::gat_forward_cuda);
  m.def("gat_backward", &neptune::gat_backward_cuda);
  m.def("gatv2_forward", &neptune::gatv2_forward_cuda);
  m.def("gatv2_backward", &neptune::gatv2_backward_cuda);
  m.def("transformer_forward", &neptune::transformer_forward_cuda);
  m.def("transformer_backward", &neptune::transformer_backward_cuda);
}
