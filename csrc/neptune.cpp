// The neptune op catalogue: every schema in one TORCH_LIBRARY block, and the
// kernels registered per dispatch key. The attention ops' autograd is C++
// (attention/common/autograd.cpp); fake (meta) kernels and the Stage's
// autograd are registered from Python (neptune_ext/ops/), see torch.library.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "graph/graph.h"
#include "linear/linear.h"
#include "memory/cpu_alloc.h"
#include "attention/gatv2/gatv2.h"
#include "attention/gat/gat.h"
#include "attention/transformer/transformer.h"
#include "stage/stage.h"

namespace neptune {
bool attention_cpu_avx2();  // attention/gat/gat_cpu.cpp
}  // namespace neptune

#ifndef NEPTUNE_CUDA_ARCHS
#define NEPTUNE_CUDA_ARCHS ""
#endif

namespace neptune {
namespace {

std::string build_info() {
  std::string s = "cpu=1";
#ifdef NEPTUNE_WITH_CUDA
  s += ";cuda=1;cuda_archs=" NEPTUNE_CUDA_ARCHS;
#ifdef NEPTUNE_WITH_CUTLASS
  s += ";cutlass=1";
#else
  s += ";cutlass=0";
#endif
#else
  s += ";cuda=0";
#endif
#ifdef _OPENMP
  s += ";openmp=1";
#else
  s += ";openmp=0";
#endif
  return s;
}

}  // namespace
}  // namespace neptune

TORCH_LIBRARY(neptune, m) {
  m.def("build_info() -> str", &neptune::build_info);

  // Graph construction: stable counting sort of an index vector (COO -> CSR).
  m.def("csr_from_index(Tensor index, int num_rows, ScalarType dtype) -> (Tensor rowptr, Tensor perm)");
  // COO edge_index -> checked CSR by destination (optionally with GATConv's self
  // loops: existing loops redirected to a phantom row num_dst, one loop appended
  // per node), and the transpose of a CSR graph. See graph/graph.h.
  m.def(
      "build_csr(Tensor edge_index, int num_src, int num_dst, ScalarType dtype, "
      "bool replace_self_loops) -> (Tensor rowptr, Tensor col, Tensor eid)");
  m.def(
      "build_csc(Tensor rowptr, Tensor col, Tensor eid, int num_src) "
      "-> (Tensor colptr, Tensor csc_row, Tensor csc_perm)");

  // Sparse graph attention over a CSR-by-destination graph (semantics: README.md).
  // eid maps CSR positions to the caller's edge ids (edge_logits and the
  // dropout RNG use caller ids); colptr/csc_row/csc_perm are the transposed
  // graph, needed only by backward (pass empty tensors for inference). On the CPU,
  // gat_backward's grad_out and out may have fewer rows than the graph (the rows past
  // them get no gradient: gat_att's phantom row); on CUDA they have N_dst rows.
  m.def(
      "gat_forward(Tensor h, Tensor score_src, Tensor score_dst, Tensor rowptr, "
      "Tensor col, Tensor eid, Tensor colptr, Tensor csc_row, Tensor csc_perm, "
      "Tensor? edge_logits, float negative_slope, float dropout, Tensor? seed) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "gat_backward(Tensor grad_out, Tensor h, Tensor score_src, Tensor score_dst, "
      "Tensor rowptr, Tensor col, Tensor eid, Tensor colptr, Tensor csc_row, "
      "Tensor csc_perm, Tensor? edge_logits, Tensor out, Tensor lse, "
      "float negative_slope, float dropout, Tensor? seed) "
      "-> (Tensor grad_h, Tensor grad_score_src, Tensor grad_score_dst, "
      "Tensor grad_edge_logits)");

  // GAT with the logit halves computed from h and the attention vectors (see
  // attention/gat/gat.h: gat_att_forward): the GraphAttention layer's step.
  m.def(
      "gat_att_forward(Tensor h, Tensor att_src, Tensor att_dst, Tensor rowptr, Tensor col, "
      "Tensor eid, Tensor colptr, Tensor csc_row, Tensor csc_perm, Tensor? edge_logits, "
      "float negative_slope, float dropout, Tensor? seed) -> (Tensor out, Tensor lse)");
  m.def(
      "gat_att_backward(Tensor grad_out, Tensor h, Tensor att_src, Tensor att_dst, "
      "Tensor rowptr, Tensor col, Tensor eid, Tensor colptr, Tensor csc_row, Tensor csc_perm, "
      "Tensor? edge_logits, Tensor out, Tensor lse, float negative_slope, float dropout, "
      "Tensor? seed) -> (Tensor grad_h, Tensor grad_att_src, Tensor grad_att_dst, "
      "Tensor grad_edge_logits)");

  // GATv2 attention (see attention/gatv2/gatv2.h): x_l [N_src, H, C] gathered per
  // edge for both the logit and the sum, x_r [N_dst, H, C], att [H, C], optional
  // edge_feat [E, H, C] in the caller's edge order. rowptr may have more rows than
  // x_r: those rows are ignored.
  m.def(
      "gatv2_forward(Tensor x_l, Tensor x_r, Tensor att, Tensor rowptr, Tensor col, "
      "Tensor eid, Tensor colptr, Tensor csc_row, Tensor csc_perm, Tensor? edge_feat, "
      "float negative_slope, float dropout, Tensor? seed) -> (Tensor out, Tensor lse)");
  m.def(
      "gatv2_backward(Tensor grad_out, Tensor x_l, Tensor x_r, Tensor att, Tensor rowptr, "
      "Tensor col, Tensor eid, Tensor colptr, Tensor csc_row, Tensor csc_perm, "
      "Tensor? edge_feat, Tensor out, Tensor lse, float negative_slope, float dropout, "
      "Tensor? seed) -> (Tensor grad_x_l, Tensor grad_x_r, Tensor grad_att, "
      "Tensor grad_edge_feat)");

  // Graph-transformer attention (see attention/transformer/transformer.h): q [N_dst, H, C],
  // k and v [N_src, H, C] gathered per edge, optional edge_feat [E, H, C] (added to k and
  // v) in the caller's edge order; logits scale * <q_i, k_j>. rowptr has N_dst + 1 rows.
  m.def(
      "transformer_forward(Tensor q, Tensor k, Tensor v, Tensor rowptr, Tensor col, "
      "Tensor eid, Tensor colptr, Tensor csc_row, Tensor csc_perm, Tensor? edge_feat, "
      "float scale, float dropout, Tensor? seed) -> (Tensor out, Tensor lse)");
  m.def(
      "transformer_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor rowptr, "
      "Tensor col, Tensor eid, Tensor colptr, Tensor csc_row, Tensor csc_perm, "
      "Tensor? edge_feat, Tensor out, Tensor lse, float scale, float dropout, "
      "Tensor? seed) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_edge_feat)");

  // Graph-transformer attention with the edge features projected inside (see
  // attention/transformer/transformer.h): q [N_dst, H, C], kv [N_src, 2, H, C] (keys, values),
  // w_edge [H, C, D], optional edge_attr [E, D] in the caller's edge order. CPU only.
  m.def(
      "transformer_edge_forward(Tensor q, Tensor kv, Tensor w_edge, Tensor rowptr, Tensor col, "
      "Tensor eid, Tensor colptr, Tensor csc_row, Tensor csc_perm, Tensor? edge_attr, "
      "float scale, float dropout, Tensor? seed) -> (Tensor out, Tensor lse)");
  m.def(
      "transformer_edge_backward(Tensor grad_out, Tensor q, Tensor kv, Tensor w_edge, "
      "Tensor rowptr, Tensor col, Tensor eid, Tensor colptr, Tensor csc_row, Tensor csc_perm, "
      "Tensor? edge_attr, Tensor out, Tensor lse, float scale, float dropout, "
      "Tensor? seed) -> (Tensor grad_q, Tensor grad_kv, Tensor grad_w_edge, "
      "Tensor grad_edge_attr)");

  // The differentiable gradients of an attention op (variant "gat", "gatv2",
  // "transformer" or "transformer_edge"), for a backward with create_graph=True: implemented in Python
  // (neptune_ext/attention/spec.py) from the pure-PyTorch reference, called by the
  // ops' C++ autograd (attention/common/autograd.cpp). Returns
  // [grad_a, grad_b, grad_c, grad_edge].
  m.def(
      "attention_grads_reference(str variant, Tensor grad_out, Tensor a, Tensor b, Tensor c, "
      "Tensor rowptr, Tensor col, Tensor eid, Tensor? edge, float scalar, float dropout, "
      "Tensor? seed) -> Tensor[]");

  // The layers' node projections: x W^T (+ b), float32 GEMMs through oneDNN where it applies
  // (see linear/linear.h).
  // onednn=False: torch's own GEMM always (its Linear's numbers to the bit); either way a
  // large output comes from the cache of CPU buffers.
  m.def("linear(Tensor input, Tensor weight, Tensor? bias, bool onednn=True) -> Tensor");
  m.def("linear_prefers_onednn() -> bool", &neptune::linear_prefers_onednn);
  // The cache of the kernels' large CPU buffers (see memory/cpu_alloc.h): [limit, held] bytes,
  // and a clear that returns the bytes it released.
  m.def("cpu_cache_info() -> int[]", &neptune::cpu_cache_info);
  m.def("cpu_cache_clear() -> int", &neptune::cpu_cache_clear);
  // Whether the attention kernels' CPU loops take their AVX2 + FMA build (attention_cpu.h).
  m.def("attention_cpu_avx2() -> bool", &neptune::attention_cpu_avx2);
  m.def(
      "linear_backward(Tensor grad_out, Tensor? input, Tensor? weight, bool[3] output_mask, "
      "bool onednn=True) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");

  // Stage: fused BatchNorm+ReLU with batch statistics (see stage/stage.h).
  m.def(
      "bn_relu_forward(Tensor x, Tensor weight, Tensor bias, float eps) "
      "-> (Tensor y, Tensor mean, Tensor var, Tensor invstd)");
  m.def(
      "bn_relu_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, "
      "Tensor mean, Tensor invstd) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  // Stage evaluation: activation(conv + bias (+ residual)) in one CUTLASS kernel (CUDA).
  m.def(
      "conv_bias_act(Tensor input, Tensor weight, Tensor bias, Tensor? residual, int[] stride, "
      "int[] padding, int[] dilation, int activation) -> Tensor");
}

namespace neptune {
at::Tensor conv_bias_act_unavailable(const at::Tensor& input, const at::Tensor&, const at::Tensor&,
                                     const std::optional<at::Tensor>&, at::IntArrayRef,
                                     at::IntArrayRef, at::IntArrayRef, int64_t) {
  TORCH_CHECK(false, "neptune::conv_bias_act runs on CUDA devices in builds with CUTLASS; got a ",
              input.device().type(), " tensor",
#ifdef NEPTUNE_WITH_CUTLASS
              ""
#else
              " (this build has no CUTLASS kernels)"
#endif
  );
}
}  // namespace neptune

// The kernels every device has, `dev` naming their suffix (cpu, cuda). The graph builders
// and the GAT-with-attention-vectors entry are device-generic (they dispatch inside).
#define NEPTUNE_DEVICE_KERNELS(m, dev)                                     \
  m.impl("build_csr", &neptune::build_csr);                                \
  m.impl("build_csc", &neptune::build_csc);                                \
  m.impl("gat_forward", &neptune::gat_forward_##dev);                      \
  m.impl("gat_backward", &neptune::gat_backward_##dev);                    \
  m.impl("gat_att_forward", &neptune::gat_att_forward);                    \
  m.impl("gat_att_backward", &neptune::gat_att_backward);                  \
  m.impl("gatv2_forward", &neptune::gatv2_forward_##dev);                  \
  m.impl("gatv2_backward", &neptune::gatv2_backward_##dev);                \
  m.impl("transformer_forward", &neptune::transformer_forward_##dev);      \
  m.impl("transformer_backward", &neptune::transformer_backward_##dev);    \
  m.impl("bn_relu_forward", &neptune::bn_relu_forward_##dev);              \
  m.impl("bn_relu_backward", &neptune::bn_relu_backward_##dev)

TORCH_LIBRARY_IMPL(neptune, CPU, m) {
  NEPTUNE_DEVICE_KERNELS(m, cpu);
  m.impl("csr_from_index", &neptune::csr_from_index_cpu);
  m.impl("transformer_edge_forward", &neptune::transformer_edge_forward_cpu);
  m.impl("transformer_edge_backward", &neptune::transformer_edge_backward_cpu);
  m.impl("conv_bias_act", &neptune::conv_bias_act_unavailable);
  m.impl("linear", &neptune::linear_cpu);
  m.impl("linear_backward", &neptune::linear_backward_cpu);
}

#ifdef NEPTUNE_WITH_CUDA
TORCH_LIBRARY_IMPL(neptune, CUDA, m) {
  NEPTUNE_DEVICE_KERNELS(m, cuda);
#ifdef NEPTUNE_WITH_CUTLASS
  m.impl("conv_bias_act", &neptune::conv_bias_act_cuda);
#else
  m.impl("conv_bias_act", &neptune::conv_bias_act_unavailable);
#endif
}
#endif

// The extension is imported as a plain Python module; the ops register
// themselves through the static initializers above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
