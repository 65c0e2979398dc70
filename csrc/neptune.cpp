// The neptune op catalogue: every schema in one TORCH_LIBRARY block, and the
// kernels registered per dispatch key. Fake (meta) kernels and autograd are
// registered from Python (neptune_ext/ops/), see torch.library.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "graph/graph.h"
#include "graph_attention/graph_attention.h"
#include "stage/stage.h"

#ifndef NEPTUNE_CUDA_ARCHS
#define NEPTUNE_CUDA_ARCHS ""
#endif

namespace neptune {
namespace {

std::string build_info() {
  std::string s = "cpu=1";
#ifdef NEPTUNE_WITH_CUDA
  s += ";cuda=1;cuda_archs=" NEPTUNE_CUDA_ARCHS;
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

  // Sparse graph attention over a CSR-by-destination graph (see DESIGN.md).
  // eid maps CSR positions to the caller's edge ids (edge_logits and the
  // dropout RNG use caller ids); colptr/csc_row/csc_perm are the transposed
  // graph, needed only by backward (pass empty tensors for inference).
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

  // Stage: fused BatchNorm+ReLU (training) and conv+bias+ReLU epilogue.
  NEPTUNE_STAGE_SCHEMAS(m);
}

TORCH_LIBRARY_IMPL(neptune, CPU, m) {
  m.impl("csr_from_index", &neptune::csr_from_index_cpu);
  m.impl("gat_forward", &neptune::gat_forward_cpu);
  m.impl("gat_backward", &neptune::gat_backward_cpu);
  NEPTUNE_STAGE_CPU_IMPLS(m);
}

#ifdef NEPTUNE_WITH_CUDA
TORCH_LIBRARY_IMPL(neptune, CUDA, m) {
  m.impl("gat_forward", &neptune::gat_forward_cuda);
  m.impl("gat_backward", &neptune::gat_backward_cuda);
  NEPTUNE_STAGE_CUDA_IMPLS(m);
}
#endif

// The extension is imported as a plain Python module; the ops register
// themselves through the static initializers above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
