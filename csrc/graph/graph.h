// Graph construction kernels (COO -> CSR by counting sort).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace neptune {

// Stable counting sort of `index` [E] (values in [0, num_rows)): returns
// rowptr [num_rows + 1] and perm [E] (perm[k] = the input position of the k-th
// element in sorted order), both of dtype `dtype` (int32 or int64).
std::tuple<at::Tensor, at::Tensor> csr_from_index_cpu(const at::Tensor& index, int64_t num_rows,
                                                      at::ScalarType dtype);

}  // namespace neptune
