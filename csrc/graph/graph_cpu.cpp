// COO -> CSR on the CPU by a stable counting sort: O(E + N), where a comparison
// sort (torch.argsort) costs O(E log E). With T threads, each thread counts its
// contiguous chunk of the input, a scan over (row, thread) gives every thread its
// write offsets, and each thread scatters its chunk in order: the result is the
// same stable permutation for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

#include "graph.h"

namespace neptune {
namespace {

template <typename in_t, typename out_t>
void counting_sort(const in_t* idx, int64_t E, int64_t N, out_t* rowptr, out_t* perm) {
  const int64_t max_threads = at::get_num_threads();
  // Per-thread histograms cost N * T counters: only split when that stays small
  // next to the input.
  int64_t T = std::max<int64_t>(1, std::min<int64_t>(max_threads, E / 65536));
  while (T > 1 && N * T > 4 * E + 65536) --T;
  const int64_t chunk = (E + T - 1) / T;
  std::vector<int64_t> counts(static_cast<size_t>((N + 1) * T), 0);  // [T][N + 1]
  std::vector<int64_t> bad(static_cast<size_t>(T), -1);

  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t* c = counts.data() + t * (N + 1);
      const int64_t lo = t * chunk, hi = std::min(E, lo + chunk);
      for (int64_t e = lo; e < hi; ++e) {
        const int64_t r = static_cast<int64_t>(idx[e]);
        if (r < 0 || r >= N) {
          bad[t] = e;
          return;
        }
        ++c[r];
      }
    }
  });
  for (int64_t t = 0; t < T; ++t) {
    if (bad[t] >= 0) {
      TORCH_CHECK(false, "neptune::csr_from_index: index[", bad[t], "] = ",
                  static_cast<int64_t>(idx[bad[t]]), " is outside [0, ", N, ")");
    }
  }
  // Exclusive scan in (row, thread) order: counts become write offsets.
  int64_t running = 0;
  for (int64_t r = 0; r < N; ++r) {
    rowptr[r] = static_cast<out_t>(running);
    for (int64_t t = 0; t < T; ++t) {
      int64_t& c = counts[t * (N + 1) + r];
      const int64_t n = c;
      c = running;
      running += n;
    }
  }
  rowptr[N] = static_cast<out_t>(running);
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t* c = counts.data() + t * (N + 1);
      const int64_t lo = t * chunk, hi = std::min(E, lo + chunk);
      for (int64_t e = lo; e < hi; ++e) perm[c[static_cast<int64_t>(idx[e])]++] = static_cast<out_t>(e);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> csr_from_index_cpu(const at::Tensor& index, int64_t num_rows,
                                                      at::ScalarType dtype) {
  TORCH_CHECK(index.dim() == 1, "neptune::csr_from_index: index must be 1-D, got ", index.sizes());
  TORCH_CHECK(num_rows >= 0, "neptune::csr_from_index: num_rows must be >= 0");
  TORCH_CHECK(dtype == at::kInt || dtype == at::kLong,
              "neptune::csr_from_index: dtype must be int32 or int64");
  const int64_t E = index.size(0);
  TORCH_CHECK(dtype == at::kLong || (E < (int64_t(1) << 31) && num_rows < (int64_t(1) << 31)),
              "neptune::csr_from_index: the graph is too large for int32 indices");
  const at::Tensor idx = index.contiguous();
  at::Tensor rowptr = at::empty({num_rows + 1}, idx.options().dtype(dtype));
  at::Tensor perm = at::empty({E}, idx.options().dtype(dtype));
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "csr_from_index_in", [&] {
    using in_t = index_t;
    AT_DISPATCH_INDEX_TYPES(dtype, "csr_from_index_out", [&] {
      counting_sort<in_t, index_t>(idx.data_ptr<in_t>(), E, num_rows, rowptr.data_ptr<index_t>(),
                                   perm.data_ptr<index_t>());
    });
  });
  return {rowptr, perm};
}

}  // namespace neptune
