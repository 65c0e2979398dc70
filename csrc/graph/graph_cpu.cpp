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
#include "memory/cpu_alloc.h"

namespace neptune {
namespace {

// The stable counting sort's skeleton: items in T contiguous chunks (chunk t: items
// [lo(t), hi(t))), count(t, c) adds chunk t's keys to its histogram c [N + 1] (or returns
// false: a bad key), the exclusive scan in (key, thread) order turns the histograms into
// write offsets and writes rowptr [N + 1], and scatter(t, c) writes chunk t's items, in
// order, at c[key]++. The same stable order for any T.
template <typename out_t, typename Count, typename Scatter>
bool counting_sort_chunks(int64_t T, int64_t N, out_t* rowptr, Count&& count, Scatter&& scatter) {
  std::vector<int64_t> counts(static_cast<size_t>((N + 1) * T), 0);  // [T][N + 1]
  std::vector<char> ok(static_cast<size_t>(T), 1);
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) ok[t] = count(t, counts.data() + t * (N + 1));
  });
  if (std::find(ok.begin(), ok.end(), 0) != ok.end()) return false;
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
    for (int64_t t = t0; t < t1; ++t) scatter(t, counts.data() + t * (N + 1));
  });
  return true;
}

// Threads for a counting sort of E items into N keys: per-thread histograms cost N * T
// counters, so split only while that stays small next to the input.
int64_t sort_threads(int64_t E, int64_t N) {
  int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), E / 65536));
  while (T > 1 && N * T > 4 * E + 65536) --T;
  return T;
}

template <typename in_t, typename out_t>
void counting_sort(const in_t* idx, int64_t E, int64_t N, out_t* rowptr, out_t* perm) {
  const int64_t T = sort_threads(E, N), chunk = (E + T - 1) / T;
  std::vector<int64_t> bad(static_cast<size_t>(T), -1);
  const bool ok = counting_sort_chunks(T, N, rowptr,
      [&](int64_t t, int64_t* c) {
        for (int64_t e = t * chunk, hi = std::min(E, (t + 1) * chunk); e < hi; ++e) {
          const int64_t r = static_cast<int64_t>(idx[e]);
          if (r < 0 || r >= N) {
            bad[t] = e;
            return false;
          }
          ++c[r];
        }
        return true;
      },
      [&](int64_t t, int64_t* c) {
        for (int64_t e = t * chunk, hi = std::min(E, (t + 1) * chunk); e < hi; ++e)
          perm[c[static_cast<int64_t>(idx[e])]++] = static_cast<out_t>(e);
      });
  if (!ok) {
    for (int64_t t = 0; t < T; ++t)
      TORCH_CHECK(bad[t] < 0, "neptune::csr_from_index: index[", bad[t], "] = ",
                  static_cast<int64_t>(idx[bad[t]]), " is outside [0, ", N, ")");
  }
}

// build_csr's sort on the CPU: the CSR of the (checked) edges src -> dst, with
// replace_self_loops the loops moved to row num_dst and n loops i -> i appended as edges
// E..E+n-1 - in one counting sort that writes rowptr, col and eid directly.
template <typename out_t>
void csr_edges(const int64_t* src, const int64_t* dst, int64_t E, int64_t num_dst, int64_t n_loops,
               bool replace, int64_t rows, out_t* rowptr, out_t* col, out_t* eid) {
  const int64_t total = E + n_loops, T = sort_threads(total, rows), chunk = (total + T - 1) / T;
  auto row_of = [&](int64_t e) -> int64_t {
    if (e >= E) return e - E;
    return replace && src[e] == dst[e] ? num_dst : dst[e];
  };
  counting_sort_chunks(T, rows, rowptr,
      [&](int64_t t, int64_t* c) {
        for (int64_t e = t * chunk, hi = std::min(total, (t + 1) * chunk); e < hi; ++e) ++c[row_of(e)];
        return true;
      },
      [&](int64_t t, int64_t* c) {
        for (int64_t e = t * chunk, hi = std::min(total, (t + 1) * chunk); e < hi; ++e) {
          const int64_t pos = c[row_of(e)]++;
          col[pos] = static_cast<out_t>(e < E ? src[e] : e - E);
          eid[pos] = static_cast<out_t>(e);
        }
      });
}

// build_csc's sort on the CPU: the CSR's positions sorted by column, stable; each thread
// owns a contiguous range of rows (so of positions), and writes csc_row from the row it
// walks instead of looking it up.
template <typename idx_t>
void csc_positions(const idx_t* rowptr, const idx_t* col, int64_t n_rows, int64_t n_src,
                   idx_t* colptr, idx_t* csc_row, idx_t* perm) {
  const int64_t E = static_cast<int64_t>(rowptr[n_rows]);
  const int64_t T = std::min<int64_t>(sort_threads(E, n_src), std::max<int64_t>(n_rows, 1));
  std::vector<int64_t> first(static_cast<size_t>(T + 1), n_rows);  // rows of chunk t
  first[0] = 0;
  for (int64_t t = 1; t < T; ++t) {  // the first row r with rowptr[r] >= E t / T
    const idx_t target = static_cast<idx_t>(E * t / T);
    first[t] = std::max<int64_t>(first[t - 1], std::lower_bound(rowptr, rowptr + n_rows, target) - rowptr);
  }
  counting_sort_chunks(T, n_src, colptr,
      [&](int64_t t, int64_t* c) {
        for (int64_t e = rowptr[first[t]]; e < rowptr[first[t + 1]]; ++e) ++c[static_cast<int64_t>(col[e])];
        return true;
      },
      [&](int64_t t, int64_t* c) {
        for (int64_t r = first[t]; r < first[t + 1]; ++r)
          for (int64_t e = rowptr[r]; e < rowptr[r + 1]; ++e) {
            const int64_t pos = c[static_cast<int64_t>(col[e])]++;
            csc_row[pos] = static_cast<idx_t>(r);
            perm[pos] = static_cast<idx_t>(e);
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
  at::Tensor perm = empty_cpu({E}, idx.options().dtype(dtype));
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "csr_from_index_in", [&] {
    using in_t = index_t;
    AT_DISPATCH_INDEX_TYPES(dtype, "csr_from_index_out", [&] {
      counting_sort<in_t, index_t>(idx.data_ptr<in_t>(), E, num_rows, rowptr.data_ptr<index_t>(),
                                   perm.data_ptr<index_t>());
    });
  });
  return {rowptr, perm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> csr_from_edges_cpu(
    const at::Tensor& edge_index, int64_t num_src, int64_t num_dst, at::ScalarType dtype,
    bool replace_self_loops) {
  const at::Tensor ei = edge_index.to(at::kLong).contiguous();
  const int64_t E = ei.size(1);
  const int64_t n_loops = replace_self_loops ? std::min(num_src, num_dst) : 0;
  const int64_t rows = replace_self_loops ? num_dst + 1 : num_dst;
  const auto opts = ei.options().dtype(dtype);
  at::Tensor rowptr = at::empty({rows + 1}, opts), col = empty_cpu({E + n_loops}, opts),
             eid = empty_cpu({E + n_loops}, opts);
  const int64_t* p = ei.data_ptr<int64_t>();
  AT_DISPATCH_INDEX_TYPES(dtype, "csr_from_edges_cpu", [&] {
    csr_edges<index_t>(p, p + E, E, num_dst, n_loops, replace_self_loops, rows,
                       rowptr.data_ptr<index_t>(), col.data_ptr<index_t>(), eid.data_ptr<index_t>());
  });
  return {rowptr, col, eid};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> csc_from_csr_cpu(const at::Tensor& rowptr,
                                                                const at::Tensor& col,
                                                                int64_t num_src) {
  const at::Tensor rp = rowptr.contiguous(), cl = col.contiguous();
  const int64_t n_rows = rp.size(0) - 1, E = cl.size(0);
  at::Tensor colptr = at::empty({num_src + 1}, cl.options()), csc_row = empty_cpu({E}, cl.options()),
             perm = empty_cpu({E}, cl.options());
  AT_DISPATCH_INDEX_TYPES(cl.scalar_type(), "csc_from_csr_cpu", [&] {
    csc_positions<index_t>(rp.data_ptr<index_t>(), cl.data_ptr<index_t>(), n_rows, num_src,
                           colptr.data_ptr<index_t>(), csc_row.data_ptr<index_t>(),
                           perm.data_ptr<index_t>());
  });
  return {colptr, csc_row, perm};
}

}  // namespace neptune
