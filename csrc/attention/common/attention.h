// What every attention variant (GAT, GATv2, graph transformer) shares on the host, CPU
// and CUDA alike: the ops' calling convention, the entry checks and the dropout seed.
// A variant's header adds only its own shape rules and its math.
//
// Python (neptune_ext/ops/) validates inputs with friendly messages first; these
// TORCH_CHECKs (shapes, dtypes) and the graph checks of graph/graph.h (ids, pointers,
// permutations), which every kernel entry runs before its kernel, are the line of
// defence for callers that reach torch.ops.neptune.* directly: a bad call is an
// exception, never an out-of-bounds read.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <initializer_list>
#include <utility>
#include <tuple>

#include "common.h"
#include "graph/graph.h"  // check_csr / check_csc: every kernel entry runs them

namespace neptune {

// The calling convention of every attention op (schemas: neptune.cpp), with (a, b, c)
// the variant's three node-side inputs, `param` its one scalar (negative_slope, scale):
//   forward(a, b, c, rowptr, col, eid, colptr, csc_row, csc_perm, edge, param, dropout,
//           seed) -> (out [N_dst, H, C], lse [N_dst, H] in the accumulation type)
//   backward(grad_out, a, b, c, <the six graph tensors>, edge, out, lse, param, dropout,
//            seed) -> (grad_a, grad_b, grad_c, grad_edge)
// A kernel is declared as `AttentionForward name;`.
using AttentionForward = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const std::optional<at::Tensor>&, double, double,
    const std::optional<at::Tensor>&);
using AttentionBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const at::Tensor&, const at::Tensor&, double, double, const std::optional<at::Tensor>&);

// The checks every entry shares, after the variant's own shape checks: `nodes` (named
// `names` in messages) share the dtype of the first; they and the CSR are contiguous;
// col and eid are [E] of one integer dtype with rowptr; the optional edge tensor (named
// `edge_name`) has shape [E, edge_shape...] and the nodes' dtype; dropout is in [0, 1)
// and `param` (named `param_name`) is finite.
inline void check_attention_args(const char* op, std::initializer_list<at::Tensor> nodes,
                                 const char* names, const at::Tensor& rowptr,
                                 const at::Tensor& col, const at::Tensor& eid,
                                 const std::optional<at::Tensor>& edge, const char* edge_name,
                                 at::IntArrayRef edge_shape, double param,
                                 const char* param_name, double dropout) {
  const at::Tensor& first = *nodes.begin();
  TORCH_CHECK(col.dim() == 1 && eid.dim() == 1 && eid.size(0) == col.size(0), op,
              ": col and eid must be [E] vectors of the same length");
  TORCH_CHECK(rowptr.scalar_type() == col.scalar_type() && eid.scalar_type() == col.scalar_type(),
              op, ": rowptr, col and eid must share one integer dtype");
  for (const at::Tensor& t : nodes) {
    TORCH_CHECK(t.scalar_type() == first.scalar_type(), op, ": ", names, " must share one dtype");
    TORCH_CHECK(t.is_contiguous(), op, ": inputs must be contiguous (", names, ")");
  }
  TORCH_CHECK(rowptr.is_contiguous() && col.is_contiguous() && eid.is_contiguous(), op,
              ": inputs must be contiguous (rowptr, col, eid)");
  if (edge.has_value()) {
    const at::Tensor& e = *edge;
    bool ok = e.dim() == static_cast<int64_t>(edge_shape.size()) + 1 && e.size(0) == col.size(0);
    for (size_t d = 0; ok && d < edge_shape.size(); ++d) ok = e.size(d + 1) == edge_shape[d];
    TORCH_CHECK(ok, op, ": ", edge_name, " must be [E, ", edge_shape, "] with E = ", col.size(0),
                ", got ", e.sizes());
    TORCH_CHECK(e.scalar_type() == first.scalar_type() && e.is_contiguous(), op, ": ", edge_name,
                " must be contiguous with the dtype of ", names);
  }
  TORCH_CHECK(dropout >= 0.0 && dropout < 1.0, op, ": dropout must be in [0, 1), got ", dropout);
  TORCH_CHECK(std::isfinite(param), op, ": ", param_name, " must be finite, got ", param);
}

// Backward's saved tensors and incoming gradient: out and grad_out have the shape
// `out_shape` (with fewer_rows, at most its rows: the rows past them get no gradient) in
// `dtype`; lse is [out_shape[0], H] in the accumulation type.
inline void check_attention_backward_tensors(const char* op, const at::Tensor& grad_out,
                                             const at::Tensor& out, const at::Tensor& lse,
                                             at::ScalarType dtype, at::IntArrayRef out_shape,
                                             int64_t H, bool fewer_rows = false) {
  TORCH_CHECK(grad_out.sizes() == out.sizes() && grad_out.scalar_type() == dtype, op,
              ": grad_out must match out in shape and dtype");
  const bool shape_ok =
      fewer_rows ? out.dim() == static_cast<int64_t>(out_shape.size()) && out.size(0) <= out_shape[0] &&
                       out.sizes().slice(1) == out_shape.slice(1)
                 : out.sizes() == out_shape;
  TORCH_CHECK(shape_ok && out.scalar_type() == dtype, op, ": out must be ", out_shape,
              fewer_rows ? " (or fewer rows)" : "", " in ", dtype, ", got ", out.sizes());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == out_shape[0] && lse.size(1) == H &&
                  lse.scalar_type() == acc_dtype(dtype),
              op, ": lse must be [", out_shape[0], ", ", H, "] in ", acc_dtype(dtype), ", got ",
              lse.sizes(), " ", lse.scalar_type());
}

// Internal linkage: the CUDA emulation build (tests/cuda_emulation) compiles its own
// version, which must not be interposed by the extension's.
namespace {
using NamedTensor = std::pair<const at::Tensor&, const char*>;

// Every tensor (and the optional edge tensor) on the first one's GPU (under the
// emulation: on its device). `op` names the op in the message.
inline void check_on_device(const char* op, std::initializer_list<NamedTensor> ts,
                            const std::optional<at::Tensor>& edge, const char* edge_name) {
  const at::Device dev = ts.begin()->first.device();
  auto check = [&](const at::Tensor& t, const char* name) {
#ifdef NEPTUNE_CUDA_EMULATION
    const bool ok = t.device() == dev;
#else
    const bool ok = t.is_cuda() && t.device() == dev;
#endif
    TORCH_CHECK(ok, op, " (CUDA): ", name, " must be on ", dev, ", got ", t.device());
  };
  for (const auto& [t, name] : ts) check(t, name);
  if (edge.has_value()) check(*edge, edge_name);
}
}  // namespace

// The dropout seed travels as an optional int64 scalar tensor on the CPU, so
// torch.compile can trace a fresh seed per step without recompiling.
inline uint64_t seed_value(const std::optional<at::Tensor>& seed, double dropout) {
  if (dropout <= 0.0) return 0;
  TORCH_CHECK(seed.has_value() && seed->numel() == 1 && seed->device().is_cpu() &&
                  seed->scalar_type() == at::kLong,
              "neptune attention: dropout > 0 needs seed, a CPU int64 tensor with one element");
  return static_cast<uint64_t>(seed->data_ptr<int64_t>()[0]);
}

}  // namespace neptune

// The parameter lists of AttentionForward and AttentionBackward for a kernel's
// definition, with the variant's names for its node inputs, edge tensor and scalar.
#define NEPTUNE_ATTENTION_FORWARD_PARAMS(A, B, C, EDGE, PARAM)                                 \
  const at::Tensor &A, const at::Tensor &B, const at::Tensor &C, const at::Tensor &rowptr,      \
      const at::Tensor &col, const at::Tensor &eid, const at::Tensor &colptr,                   \
      const at::Tensor &csc_row, const at::Tensor &csc_perm,                                    \
      const std::optional<at::Tensor> &EDGE, double PARAM, double dropout,                      \
      const std::optional<at::Tensor> &seed
#define NEPTUNE_ATTENTION_BACKWARD_PARAMS(A, B, C, EDGE, PARAM)                                \
  const at::Tensor &grad_out, const at::Tensor &A, const at::Tensor &B, const at::Tensor &C,    \
      const at::Tensor &rowptr, const at::Tensor &col, const at::Tensor &eid,                   \
      const at::Tensor &colptr, const at::Tensor &csc_row, const at::Tensor &csc_perm,          \
      const std::optional<at::Tensor> &EDGE, const at::Tensor &out, const at::Tensor &lse,      \
      double PARAM, double dropout, const std::optional<at::Tensor> &seed

// Runs the statements with scalar_t bound to the floating dtype (float64, float32,
// float16, bfloat16) and index_t to the index dtype (int32, int64).
#define NEPTUNE_DISPATCH_FLOAT_AND_INDEX(FLOAT_TYPE, INDEX_TYPE, NAME, ...)                     \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, FLOAT_TYPE, NAME, [&] {             \
    AT_DISPATCH_INDEX_TYPES(INDEX_TYPE, NAME "_index", __VA_ARGS__);                             \
  })
