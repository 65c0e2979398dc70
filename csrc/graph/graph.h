// Graph construction and the graph checks every kernel entry relies on.
//
// Safety by construction: a kernel that walks a graph reads h[col[k]],
// edge_logits[eid[k]], score_dst[csc_row[k]], ... with no bounds checks of its
// own, so every graph that reaches one is checked first, on every path (eager,
// torch.compile, a hand-built neptune_ext.Graph, a direct torch.ops call):
//
//  - build_csr / build_csc check their input and register their outputs as
//    validated (they are valid by construction);
//  - check_csr / check_csc, called by every kernel entry, return at once for
//    registered tensors and otherwise validate them completely (one host sync
//    on CUDA) and register them.
//
// The registry holds weak references: an entry matches only the very same
// tensors (TensorImpl identity, which a weak reference keeps from being reused),
// unmodified since (version counter, data pointer, size). In-place writes that
// bypass the version counter (through .data, .numpy() or DLPack) are not seen;
// inference tensors have no version counter and are validated on every call.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace neptune {

// Stable counting sort of `index` [E] (values in [0, num_rows)): returns
// rowptr [num_rows + 1] and perm [E] (perm[k] = the input position of the k-th
// element in sorted order), both of dtype `dtype` (int32 or int64).
std::tuple<at::Tensor, at::Tensor> csr_from_index_cpu(const at::Tensor& index, int64_t num_rows,
                                                      at::ScalarType dtype);

// build_csr's and build_csc's CPU paths, on inputs they checked: the CSR of edge_index
// (rowptr, col, eid; self loops replaced as build_csr says) in one counting sort, and the
// CSC of a CSR (colptr, csc_row, csc_perm; csc_row written as the rows are walked).
std::tuple<at::Tensor, at::Tensor, at::Tensor> csr_from_edges_cpu(
    const at::Tensor& edge_index, int64_t num_src, int64_t num_dst, at::ScalarType dtype,
    bool replace_self_loops);
std::tuple<at::Tensor, at::Tensor, at::Tensor> csc_from_csr_cpu(const at::Tensor& rowptr,
                                                                const at::Tensor& col,
                                                                int64_t num_src);

// COO edge_index [2, E] -> CSR by destination (rowptr, col, eid), ids checked
// (ValueError naming edge_index). With replace_self_loops, the graph's self loops are
// replaced by one loop i -> i per i < min(num_src, num_dst) without a data-dependent
// size: the existing loops move to an extra destination row num_dst (the CSR has
// num_dst + 1 rows; a caller ignores that row's output) and the new loops are appended.
// (PyG's remove_self_loops + add_self_loops, as GATConv applies them.)
std::tuple<at::Tensor, at::Tensor, at::Tensor> build_csr(const at::Tensor& edge_index,
                                                         int64_t num_src, int64_t num_dst,
                                                         at::ScalarType dtype,
                                                         bool replace_self_loops);

// The transpose of a CSR graph: (colptr [num_src + 1], csc_row [E], csc_perm [E]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> build_csc(const at::Tensor& rowptr,
                                                         const at::Tensor& col,
                                                         const at::Tensor& eid, int64_t num_src);

// ValueError unless (rowptr, col, eid) is a CSR graph with n_dst rows over n_src
// sources: rowptr [n_dst + 1] non-decreasing from 0 to E, col in [0, n_src), eid
// a permutation of [0, E).
void check_csr(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& eid,
               int64_t n_src, int64_t n_dst, const char* op);

// ValueError unless (colptr, csc_row, csc_perm) is exactly the transpose of the
// (already checked) CSR graph: colptr [n_src + 1] non-decreasing from 0 to E,
// csc_perm a permutation of [0, E), col[csc_perm[k]] = the column of k and
// csc_row[k] = the row of csc_perm[k].
void check_csc(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& eid,
               const at::Tensor& colptr, const at::Tensor& csc_row, const at::Tensor& csc_perm,
               int64_t n_src, int64_t n_dst, const char* op);

}  // namespace neptune
