// Graph construction ops and the graph checks of every kernel entry (see graph.h).
// Written with ATen operators (the CPU builds: counting sorts in graph_cpu.cpp), so one path serves every other device:
// a check reads back one small tensor of statistics (one host sync on CUDA) and
// never indexes with an unchecked value (indices are clamped before any gather,
// and binary searches stay in bounds whatever the data).
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <deque>
#include <limits>
#include <mutex>
#include <vector>

#include "graph.h"

namespace neptune {
namespace {

// ---------------------------------------------------------------- registry
using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

struct Ref {
  WeakImpl impl;
  int64_t version;
  const void* data;
  int64_t numel;
};

struct Entry {
  std::vector<Ref> refs;
  std::vector<int64_t> ints;
};

constexpr size_t kMaxEntries = 64;
// Never destroyed: entries must not outlive torch's own state at process exit.
std::mutex& registry_mutex = *new std::mutex();
std::deque<Entry>& registry = *new std::deque<Entry>();  // most recent first

bool trackable(const at::Tensor& t) { return t.defined() && !t.is_inference(); }

bool matches(const Ref& r, const at::Tensor& t) {
  const auto strong = r.impl.lock();
  return strong.get() == t.unsafeGetTensorImpl() && t._version() == r.version &&
         t.const_data_ptr() == r.data && t.numel() == r.numel;
}

bool is_registered(std::initializer_list<at::Tensor> ts, std::initializer_list<int64_t> ints) {
  for (const auto& t : ts)
    if (!trackable(t)) return false;
  std::lock_guard<std::mutex> lock(registry_mutex);
  for (const Entry& e : registry) {
    if (e.refs.size() != ts.size() || !std::equal(ints.begin(), ints.end(), e.ints.begin(), e.ints.end()))
      continue;
    bool all = true;
    size_t i = 0;
    for (const auto& t : ts) all = all && matches(e.refs[i++], t);
    if (all) return true;
  }
  return false;
}

void register_validated(std::initializer_list<at::Tensor> ts, std::initializer_list<int64_t> ints) {
  for (const auto& t : ts)
    if (!trackable(t)) return;
  Entry e;
  for (const auto& t : ts)
    e.refs.push_back(Ref{WeakImpl(t.getIntrusivePtr()), t._version(), t.const_data_ptr(), t.numel()});
  e.ints.assign(ints.begin(), ints.end());
  std::lock_guard<std::mutex> lock(registry_mutex);
  // Entries whose tensors are gone can never match again: drop them first.
  registry.erase(std::remove_if(registry.begin(), registry.end(),
                                [](const Entry& x) {
                                  for (const Ref& r : x.refs)
                                    if (r.impl.expired()) return true;
                                  return false;
                                }),
                 registry.end());
  registry.push_front(std::move(e));
  if (registry.size() > kMaxEntries) registry.pop_back();
}

// --------------------------------------------------------------- helpers
bool is_index_dtype(at::ScalarType t) { return t == at::kInt || t == at::kLong; }

// Non-decreasing from 0 to E: (first, last, min step) of a pointer vector, as int64 scalars.
std::vector<at::Tensor> ptr_stats(const at::Tensor& ptr) {
  const at::Tensor p = ptr.to(at::kLong);
  const int64_t n = p.size(0);
  at::Tensor min_step = n > 1 ? (p.slice(0, 1) - p.slice(0, 0, n - 1)).min() : at::zeros({}, p.options());
  return {p[0], p[n - 1], min_step};
}

// 1 if `perm` [E] is not a permutation of [0, E), as an int64 scalar (no host sync).
at::Tensor not_a_permutation(const at::Tensor& perm) {
  const int64_t E = perm.size(0);
  const at::Tensor sorted = std::get<0>(at::sort(perm.to(at::kLong)));
  return sorted.ne(at::arange(E, sorted.options())).any().to(at::kLong);
}

std::vector<int64_t> read_back(const std::vector<at::Tensor>& stats) {
  const at::Tensor s = at::stack(stats).to(at::kLong).cpu();
  return std::vector<int64_t>(s.data_ptr<int64_t>(), s.data_ptr<int64_t>() + s.numel());
}

// The row of every CSR position [E] (int64), for a checked rowptr.
at::Tensor row_of_positions(const at::Tensor& rowptr, int64_t E) {
  const at::Tensor rp = rowptr.to(at::kLong);
  const int64_t rows = rp.size(0) - 1;
  return at::repeat_interleave(at::arange(rows, rp.options()), rp.slice(0, 1) - rp.slice(0, 0, rows),
                               0, E);
}

void check_ptr(const std::vector<int64_t>& v, size_t at_, int64_t E, const char* op,
               const char* name) {
  TORCH_CHECK_VALUE(v[at_] == 0 && v[at_ + 1] == E && v[at_ + 2] >= 0, op, ": ", name,
                    " must be non-decreasing from 0 to E = ", E, ", got first ", v[at_],
                    ", last ", v[at_ + 1], (v[at_ + 2] < 0 ? ", and a decreasing step" : ""));
}

// The names a compressed index (CSR or CSC) has in messages.
struct CompressedNames {
  const char* ptr;    // rowptr / colptr
  const char* index;  // col / csc_row
  const char* ids;    // which node ids index holds: source / destination
  const char* bound;  // num_src / num_dst
  const char* perm;   // eid / csc_perm
};

// What a check of (ptr, index, perm) reads back, in one transfer: ptr_stats, then (E > 0)
// index's min and max and whether perm is not a permutation.
std::vector<at::Tensor> compressed_stats(const at::Tensor& ptr, const at::Tensor& index,
                                         const at::Tensor& perm) {
  std::vector<at::Tensor> stats = ptr_stats(ptr);
  if (index.size(0) > 0) {
    const at::Tensor i = index.to(at::kLong);
    stats.push_back(i.min());
    stats.push_back(i.max());
    stats.push_back(not_a_permutation(perm));
  }
  return stats;
}

// Checks what compressed_stats read back: ptr from 0 to E, index in [0, bound), perm a
// permutation of [0, E).
void check_compressed(const std::vector<int64_t>& v, int64_t E, int64_t bound, const char* op,
                      const CompressedNames& n) {
  check_ptr(v, 0, E, op, n.ptr);
  if (E == 0) return;
  TORCH_CHECK_VALUE(v[3] >= 0 && v[4] < bound, op, ": ", n.index, " (", n.ids,
                    " ids) must be in [0, ", n.bound, " = ", bound, "), got values from ", v[3],
                    " to ", v[4]);
  TORCH_CHECK_VALUE(v[5] == 0, op, ": ", n.perm, " must be a permutation of [0, E = ", E, ")");
}

}  // namespace

// ------------------------------------------------------------------ checks
void check_csr(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& eid,
               int64_t n_src, int64_t n_dst, const char* op) {
  TORCH_CHECK_VALUE(rowptr.dim() == 1 && rowptr.size(0) == n_dst + 1, op,
                    ": rowptr must be [N_dst + 1] = [", n_dst + 1, "], got ", rowptr.sizes());
  TORCH_CHECK_VALUE(col.dim() == 1 && eid.dim() == 1 && eid.size(0) == col.size(0), op,
                    ": col and eid must be [E] vectors of the same length");
  TORCH_CHECK_VALUE(is_index_dtype(rowptr.scalar_type()) && rowptr.scalar_type() == col.scalar_type() &&
                        eid.scalar_type() == col.scalar_type(),
                    op, ": rowptr, col and eid must share one dtype, int32 or int64");
  TORCH_CHECK_VALUE(rowptr.device() == col.device() && eid.device() == col.device(), op,
                    ": rowptr, col and eid must be on one device");
  if (is_registered({rowptr, col, eid}, {n_src, n_dst})) return;
  const int64_t E = col.size(0);
  const std::vector<int64_t> v = read_back(compressed_stats(rowptr, col, eid));
  check_compressed(v, E, n_src, op, {"rowptr", "col", "source", "num_src", "eid"});
  register_validated({rowptr, col, eid}, {n_src, n_dst});
}

void check_csc(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& eid,
               const at::Tensor& colptr, const at::Tensor& csc_row, const at::Tensor& csc_perm,
               int64_t n_src, int64_t n_dst, const char* op) {
  const int64_t E = col.size(0);
  TORCH_CHECK_VALUE(colptr.dim() == 1 && colptr.size(0) == n_src + 1, op,
                    ": colptr must be [N_src + 1] = [", n_src + 1, "], got ", colptr.sizes(),
                    " (pass the transposed graph to the forward op when gradients are needed)");
  TORCH_CHECK_VALUE(csc_row.dim() == 1 && csc_row.size(0) == E && csc_perm.dim() == 1 &&
                        csc_perm.size(0) == E,
                    op, ": csc_row and csc_perm must be [E] = [", E, "]");
  TORCH_CHECK_VALUE(colptr.scalar_type() == col.scalar_type() &&
                        csc_row.scalar_type() == col.scalar_type() &&
                        csc_perm.scalar_type() == col.scalar_type(),
                    op, ": the transposed graph must use the index dtype of col");
  TORCH_CHECK_VALUE(colptr.device() == col.device() && csc_row.device() == col.device() &&
                        csc_perm.device() == col.device(),
                    op, ": the transposed graph must be on the device of col");
  if (is_registered({rowptr, col, eid, colptr, csc_row, csc_perm}, {n_src, n_dst})) return;
  std::vector<at::Tensor> stats = compressed_stats(colptr, csc_row, csc_perm);
  if (E > 0) {
    const at::Tensor r = csc_row.to(at::kLong);
    // Consistency with the CSR graph, gathered through clamped indices (safe
    // whatever the values; a bad value already fails a check above).
    const at::Tensor p = csc_perm.to(at::kLong).clamp(0, E - 1);
    const at::Tensor cp = colptr.to(at::kLong);
    const at::Tensor k = at::arange(E, cp.options());
    const at::Tensor column_of_k = at::searchsorted(cp, k, /*out_int32=*/false, /*right=*/true) - 1;
    stats.push_back(col.to(at::kLong).index_select(0, p).ne(column_of_k).any().to(at::kLong));
    stats.push_back(row_of_positions(rowptr, E).index_select(0, p).ne(r).any().to(at::kLong));
  }
  const std::vector<int64_t> v = read_back(stats);
  check_compressed(v, E, n_dst, op, {"colptr", "csc_row", "destination", "num_dst", "csc_perm"});
  if (E > 0) {
    TORCH_CHECK_VALUE(v[6] == 0 && v[7] == 0, op,
                      ": (colptr, csc_row, csc_perm) is not the transpose of (rowptr, col, eid)");
  }
  register_validated({rowptr, col, eid, colptr, csc_row, csc_perm}, {n_src, n_dst});
}

// ------------------------------------------------------------ construction
std::tuple<at::Tensor, at::Tensor, at::Tensor> build_csr(const at::Tensor& edge_index,
                                                         int64_t num_src, int64_t num_dst,
                                                         at::ScalarType dtype,
                                                         bool replace_self_loops) {
  TORCH_CHECK_VALUE(edge_index.dim() == 2 && edge_index.size(0) == 2,
                    "edge_index must have shape [2, E], got ", edge_index.sizes());
  TORCH_CHECK_VALUE(at::isIntegralType(edge_index.scalar_type(), /*includeBool=*/false),
                    "edge_index must have an integer dtype, got ", edge_index.scalar_type());
  TORCH_CHECK_VALUE(num_src >= 0 && num_dst >= 0, "size: num_src and num_dst must be >= 0, got (",
                    num_src, ", ", num_dst, ")");
  TORCH_CHECK_VALUE(is_index_dtype(dtype), "neptune::build_csr: dtype must be int32 or int64");
  const at::Tensor ei = edge_index.to(at::kLong);
  const int64_t E = ei.size(1);
  if (E > 0) {
    const std::vector<int64_t> v = read_back({ei.min(), ei[0].max(), ei[1].max()});
    TORCH_CHECK_VALUE(v[0] >= 0, "edge_index contains a negative node id (", v[0], ")");
    TORCH_CHECK_VALUE(v[1] < num_src, "edge_index[0] (sources) contains node id ", v[1],
                      ", outside [0, num_src=", num_src, ")");
    TORCH_CHECK_VALUE(v[2] < num_dst, "edge_index[1] (destinations) contains node id ", v[2],
                      ", outside [0, num_dst=", num_dst, ")");
  }
  constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
  if (ei.is_cpu()) {
    const int64_t total_cpu = E + (replace_self_loops ? std::min(num_src, num_dst) : 0);
    const int64_t rows_cpu = replace_self_loops ? num_dst + 1 : num_dst;
    TORCH_CHECK_VALUE(dtype == at::kLong || (total_cpu <= kInt32Max && rows_cpu < kInt32Max),
                      "neptune::build_csr: the graph is too large for int32 indices");
    auto [rowptr, col, eid] = csr_from_edges_cpu(ei, num_src, num_dst, dtype, replace_self_loops);
    register_validated({rowptr, col, eid}, {num_src, rowptr.size(0) - 1});
    return {rowptr, col, eid};
  }
  at::Tensor src = ei[0], dst = ei[1];
  int64_t rows = num_dst;
  if (replace_self_loops) {
    const int64_t n = std::min(num_src, num_dst);
    dst = at::where(src.eq(dst), at::full({}, num_dst, dst.options()), dst);
    const at::Tensor loops = at::arange(n, ei.options());
    src = at::cat({src, loops});
    dst = at::cat({dst, loops});
    rows = num_dst + 1;
  }
  const int64_t total = src.size(0);
  TORCH_CHECK_VALUE(dtype == at::kLong || (total <= kInt32Max && rows < kInt32Max),
                    "neptune::build_csr: the graph is too large for int32 indices");
  auto sorted = at::sort(dst, std::optional<bool>(true), 0, false);
  at::Tensor rowptr = at::searchsorted(std::get<0>(sorted), at::arange(rows + 1, dst.options())).to(dtype);
  at::Tensor perm = std::get<1>(sorted).to(dtype);
  at::Tensor col = src.index_select(0, perm).to(dtype);
  register_validated({rowptr, col, perm}, {num_src, rows});
  return {rowptr, col, perm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> build_csc(const at::Tensor& rowptr,
                                                         const at::Tensor& col,
                                                         const at::Tensor& eid, int64_t num_src) {
  TORCH_CHECK_VALUE(rowptr.dim() == 1 && rowptr.size(0) >= 1, "neptune::build_csc: rowptr must be [N_dst + 1]");
  TORCH_CHECK_VALUE(num_src >= 0, "neptune::build_csc: num_src must be >= 0");
  const int64_t n_dst = rowptr.size(0) - 1, E = col.size(0);
  check_csr(rowptr, col, eid, num_src, n_dst, "neptune::build_csc");
  const at::ScalarType dtype = col.scalar_type();
  // (check_csr: rowptr, col and eid share one dtype)
  if (col.is_cpu()) {
    auto [colptr, csc_row, perm] = csc_from_csr_cpu(rowptr, col, num_src);
    register_validated({rowptr, col, eid, colptr, csc_row, perm}, {num_src, n_dst});
    return {colptr, csc_row, perm};
  }
  auto sorted = at::sort(col.to(at::kLong), std::optional<bool>(true), 0, false);
  at::Tensor colptr = at::searchsorted(std::get<0>(sorted), at::arange(num_src + 1, rowptr.options().dtype(at::kLong)))
                          .to(dtype);
  at::Tensor perm = std::get<1>(sorted).to(dtype);
  at::Tensor csc_row = row_of_positions(rowptr, E).index_select(0, perm).to(dtype);
  register_validated({rowptr, col, eid, colptr, csc_row, perm}, {num_src, n_dst});
  return {colptr, csc_row, perm};
}

}  // namespace neptune
