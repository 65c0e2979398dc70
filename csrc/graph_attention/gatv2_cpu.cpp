// Fused GATv2 attention on the CPU (semantics and passes: gatv2.h).
//
// One thread owns a destination in forward and backward pass 1, and a source in
// pass 2; grad att is summed per fixed block of destinations and then over the
// blocks in order. No atomics: bitwise deterministic for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "gatv2.h"
#include "graph_attention_math.h"

namespace neptune {
namespace {

constexpr int64_t kPrefetch = 6;

template <typename T>
inline void prefetch(const T* row, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 1);
}

int64_t grain(int64_t rows, int64_t edges, int64_t HC) {
  const int64_t per_row = std::max<int64_t>(1, (edges / std::max<int64_t>(rows, 1) + 1) * HC);
  return std::max<int64_t>(1, 16384 / per_row);
}

// z = x_l[j] + x_r[i] (+ ef), in the accumulation type.
template <typename scalar_t, typename acc_t>
inline void edge_z(acc_t* z, const scalar_t* xlj, const acc_t* xri, const scalar_t* ef, int64_t HC) {
  if (ef) {
#pragma omp simd
    for (int64_t c = 0; c < HC; ++c)
      z[c] = static_cast<acc_t>(xlj[c]) + xri[c] + static_cast<acc_t>(ef[c]);
  } else {
#pragma omp simd
    for (int64_t c = 0; c < HC; ++c) z[c] = static_cast<acc_t>(xlj[c]) + xri[c];
  }
}

template <typename acc_t>
inline acc_t head_logit(const acc_t* z, const acc_t* att, int64_t C, acc_t slope) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < C; ++c) s += att[c] * leaky_relu(z[c], slope);
  return s;
}

template <typename scalar_t, typename index_t>
void forward_kernel(const at::Tensor& xl_t, const at::Tensor& xr_t, const at::Tensor& att_t,
                    const at::Tensor& rowptr_t, const at::Tensor& col_t, const at::Tensor& eid_t,
                    const std::optional<at::Tensor>& ef_t, at::Tensor& out_t, at::Tensor& lse_t,
                    double slope_d, double p_d, uint64_t seed) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n_dst = xr_t.size(0), H = xl_t.size(1), C = xl_t.size(2), HC = H * C;
  const int64_t E = col_t.size(0);
  const scalar_t* xl = xl_t.data_ptr<scalar_t>();
  const scalar_t* xr = xr_t.data_ptr<scalar_t>();
  const scalar_t* ef = ef_t.has_value() ? ef_t->data_ptr<scalar_t>() : nullptr;
  const index_t* rowptr = rowptr_t.data_ptr<index_t>();
  const index_t* col = col_t.data_ptr<index_t>();
  const index_t* eid = eid_t.data_ptr<index_t>();
  scalar_t* out = out_t.data_ptr<scalar_t>();
  acc_t* lse = lse_t.data_ptr<acc_t>();
  const acc_t slope = static_cast<acc_t>(slope_d);
  const bool use_dropout = p_d > 0.0;
  const float p = static_cast<float>(p_d);
  const acc_t keep_scale = dropout_keep_scale<acc_t>(p_d);
  std::vector<acc_t> att(HC);
  for (int64_t c = 0; c < HC; ++c) att[c] = static_cast<acc_t>(att_t.data_ptr<scalar_t>()[c]);

  at::parallel_for(0, n_dst, grain(n_dst, E, HC), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(HC), z(HC), xri(HC), m(H), s(H);
    for (int64_t i = begin; i < end; ++i) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(s.begin(), s.end(), acc_t(0));
      for (int64_t c = 0; c < HC; ++c) xri[c] = static_cast<acc_t>(xr[i * HC + c]);
      const int64_t e_end = rowptr[i + 1];
      for (int64_t e = rowptr[i]; e < e_end; ++e) {
        if (e + kPrefetch < E) {
          prefetch(xl + static_cast<int64_t>(col[e + kPrefetch]) * HC, HC);
          if (ef) prefetch(ef + static_cast<int64_t>(eid[e + kPrefetch]) * HC, HC);
        }
        const int64_t j = col[e], edge = eid[e];
        const scalar_t* xlj = xl + j * HC;
        edge_z(z.data(), xlj, xri.data(), ef ? ef + edge * HC : nullptr, HC);
        for (int64_t k = 0; k < H; ++k) {
          const acc_t x = head_logit(z.data() + k * C, att.data() + k * C, C, slope);
          acc_t rescale, w;
          online_softmax_step(x, m[k], s[k], rescale, w);
          if (use_dropout) w = dropout_keep(seed, edge, k, p) ? w * keep_scale : acc_t(0);
          acc_t* a = acc.data() + k * C;
          const scalar_t* hv = xlj + k * C;
          if (rescale != acc_t(1)) {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) a[c] = a[c] * rescale + w * static_cast<acc_t>(hv[c]);
          } else {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) a[c] += w * static_cast<acc_t>(hv[c]);
          }
        }
      }
      for (int64_t k = 0; k < H; ++k) {
        const bool any = softmax_has_mass(s[k]);
        const acc_t inv = any ? acc_t(1) / s[k] : acc_t(0);
        lse[i * H + k] = any ? m[k] + std::log(s[k]) : acc_t(0);
        scalar_t* o = out + i * HC + k * C;
        const acc_t* a = acc.data() + k * C;
        for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(a[c] * inv);
      }
    }
  });
}

template <typename scalar_t, typename index_t>
void backward_kernel(const at::Tensor& go_t, const at::Tensor& xl_t, const at::Tensor& xr_t,
                     const at::Tensor& att_t, const at::Tensor& rowptr_t, const at::Tensor& col_t,
                     const at::Tensor& eid_t, const at::Tensor& colptr_t,
                     const at::Tensor& csc_row_t, const at::Tensor& csc_perm_t,
                     const std::optional<at::Tensor>& ef_t, const at::Tensor& out_t,
                     const at::Tensor& lse_t, double slope_d, double p_d, uint64_t seed,
                     at::Tensor& gxl_t, at::Tensor& gxr_t, at::Tensor& gatt_t, at::Tensor& gef_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n_src = xl_t.size(0), n_dst = xr_t.size(0), H = xl_t.size(1), C = xl_t.size(2),
                HC = H * C, E = col_t.size(0);
  const scalar_t* go = go_t.data_ptr<scalar_t>();
  const scalar_t* xl = xl_t.data_ptr<scalar_t>();
  const scalar_t* xr = xr_t.data_ptr<scalar_t>();
  const scalar_t* ef = ef_t.has_value() ? ef_t->data_ptr<scalar_t>() : nullptr;
  const scalar_t* out = out_t.data_ptr<scalar_t>();
  const acc_t* lse = lse_t.data_ptr<acc_t>();
  const index_t* rowptr = rowptr_t.data_ptr<index_t>();
  const index_t* col = col_t.data_ptr<index_t>();
  const index_t* eid = eid_t.data_ptr<index_t>();
  const index_t* colptr = colptr_t.data_ptr<index_t>();
  const index_t* csc_row = csc_row_t.data_ptr<index_t>();
  const index_t* csc_perm = csc_perm_t.data_ptr<index_t>();
  scalar_t* gxl = gxl_t.data_ptr<scalar_t>();
  scalar_t* gxr = gxr_t.data_ptr<scalar_t>();
  scalar_t* gef = ef ? gef_t.data_ptr<scalar_t>() : nullptr;
  const acc_t slope = static_cast<acc_t>(slope_d);
  const bool use_dropout = p_d > 0.0;
  const float p = static_cast<float>(p_d);
  const acc_t keep_scale = dropout_keep_scale<acc_t>(p_d);
  std::vector<acc_t> att(HC);
  for (int64_t c = 0; c < HC; ++c) att[c] = static_cast<acc_t>(att_t.data_ptr<scalar_t>()[c]);

  // Per-edge dS and a' in CSR order (E x H scratch, backward only).
  at::Tensor ds_t = at::empty({E, H}, lse_t.options());
  at::Tensor ap_t = at::empty({E, H}, lse_t.options());
  acc_t* ds = ds_t.data_ptr<acc_t>();
  acc_t* ap = ap_t.data_ptr<acc_t>();
  const int64_t n_blocks = (n_dst + kGatv2AttBlock - 1) / kGatv2AttBlock;
  at::Tensor part_t = at::zeros({std::max<int64_t>(n_blocks, 1), HC}, lse_t.options());
  acc_t* part = part_t.data_ptr<acc_t>();

  // Pass 1: destinations, in fixed blocks.
  const int64_t block_grain = std::max<int64_t>(1, grain(n_dst, E, HC) / kGatv2AttBlock);
  at::parallel_for(0, n_blocks, block_grain, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> z(HC), xri(HC), gxri(HC), D(H), g(H), dS(H);
    for (int64_t b = b0; b < b1; ++b) {
      acc_t* ga = part + b * HC;
      const int64_t i_end = std::min(n_dst, (b + 1) * kGatv2AttBlock);
      for (int64_t i = b * kGatv2AttBlock; i < i_end; ++i) {
        const scalar_t* goi = go + i * HC;
        const scalar_t* oi = out + i * HC;
        for (int64_t c = 0; c < HC; ++c) {
          xri[c] = static_cast<acc_t>(xr[i * HC + c]);
          gxri[c] = 0;
        }
        for (int64_t k = 0; k < H; ++k) {
          acc_t d = 0;
          for (int64_t c = k * C; c < (k + 1) * C; ++c)
            d += static_cast<acc_t>(goi[c]) * static_cast<acc_t>(oi[c]);
          D[k] = d;
        }
        for (int64_t e = rowptr[i]; e < rowptr[i + 1]; ++e) {
          if (e + kPrefetch < E) {
            prefetch(xl + static_cast<int64_t>(col[e + kPrefetch]) * HC, HC);
            if (ef) prefetch(ef + static_cast<int64_t>(eid[e + kPrefetch]) * HC, HC);
          }
          const int64_t j = col[e], edge = eid[e];
          const scalar_t* xlj = xl + j * HC;
          edge_z(z.data(), xlj, xri.data(), ef ? ef + edge * HC : nullptr, HC);
          bool any = false;
          for (int64_t k = 0; k < H; ++k) {
            const acc_t x = head_logit(z.data() + k * C, att.data() + k * C, C, slope);
            const acc_t a = std::exp(x - lse[i * H + k]);
            acc_t a_kept = a;
            if (use_dropout) a_kept = dropout_keep(seed, edge, k, p) ? a * keep_scale : acc_t(0);
            acc_t gk = 0;
            if (a_kept != acc_t(0)) {
              const scalar_t* hv = xlj + k * C;
              const scalar_t* gv = goi + k * C;
#pragma omp simd reduction(+ : gk)
              for (int64_t c = 0; c < C; ++c) gk += static_cast<acc_t>(gv[c]) * static_cast<acc_t>(hv[c]);
            }
            dS[k] = a_kept * gk - a * D[k];
            ds[e * H + k] = dS[k];
            ap[e * H + k] = a_kept;
            any = any || dS[k] != acc_t(0);
          }
          scalar_t* gefe = gef ? gef + edge * HC : nullptr;
          if (!any) {
            if (gefe) std::fill(gefe, gefe + HC, scalar_t(0));
            continue;
          }
          for (int64_t k = 0; k < H; ++k) {
            const acc_t d = dS[k];
            const acc_t* zk = z.data() + k * C;
            const acc_t* ak = att.data() + k * C;
            acc_t* gxk = gxri.data() + k * C;
            acc_t* gak = ga + k * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              gxk[c] += d * ak[c] * leaky_relu_grad(zk[c], slope);
              gak[c] += d * leaky_relu(zk[c], slope);
            }
            if (gefe) {
              for (int64_t c = 0; c < C; ++c)
                gefe[k * C + c] = static_cast<scalar_t>(d * ak[c] * leaky_relu_grad(zk[c], slope));
            }
          }
        }
        for (int64_t c = 0; c < HC; ++c) gxr[i * HC + c] = static_cast<scalar_t>(gxri[c]);
      }
    }
  });
  // Edges of the ignored rows (>= n_dst): zero gradient.
  if (gef && rowptr_t.size(0) - 1 > n_dst) {
    for (int64_t e = rowptr[n_dst]; e < E; ++e)
      std::fill(gef + static_cast<int64_t>(eid[e]) * HC, gef + (static_cast<int64_t>(eid[e]) + 1) * HC,
                scalar_t(0));
  }
  // grad att: the blocks in order.
  {
    std::vector<acc_t> total(HC, acc_t(0));
    for (int64_t b = 0; b < n_blocks; ++b)
      for (int64_t c = 0; c < HC; ++c) total[c] += part[b * HC + c];
    scalar_t* gatt = gatt_t.data_ptr<scalar_t>();
    for (int64_t c = 0; c < HC; ++c) gatt[c] = static_cast<scalar_t>(total[c]);
  }

  // Pass 2: sources, over the transposed graph.
  at::parallel_for(0, n_src, grain(n_src, E, HC), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(HC), xlj(HC), z(HC);
    for (int64_t j = begin; j < end; ++j) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t c = 0; c < HC; ++c) xlj[c] = static_cast<acc_t>(xl[j * HC + c]);
      for (int64_t t = colptr[j]; t < colptr[j + 1]; ++t) {
        if (t + kPrefetch < E) {
          const int64_t in = csc_row[t + kPrefetch];
          if (in < n_dst) {
            prefetch(go + in * HC, HC);
            prefetch(xr + in * HC, HC);
          }
        }
        const int64_t i = csc_row[t];
        if (i >= n_dst) continue;
        const int64_t e = csc_perm[t];
        const scalar_t* goi = go + i * HC;
        const scalar_t* xri = xr + i * HC;
        const scalar_t* efe = ef ? ef + static_cast<int64_t>(eid[e]) * HC : nullptr;
        for (int64_t k = 0; k < H; ++k) {
          const acc_t w = ap[e * H + k], d = ds[e * H + k];
          acc_t* a = acc.data() + k * C;
          if (w != acc_t(0)) {
            const scalar_t* gv = goi + k * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) a[c] += w * static_cast<acc_t>(gv[c]);
          }
          if (d != acc_t(0)) {
            const acc_t* ak = att.data() + k * C;
            const acc_t* xk = xlj.data() + k * C;
            const scalar_t* rk = xri + k * C;
            if (efe) {
              const scalar_t* fk = efe + k * C;
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) {
                const acc_t zc = xk[c] + static_cast<acc_t>(rk[c]) + static_cast<acc_t>(fk[c]);
                a[c] += d * ak[c] * leaky_relu_grad(zc, slope);
              }
            } else {
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) {
                const acc_t zc = xk[c] + static_cast<acc_t>(rk[c]);
                a[c] += d * ak[c] * leaky_relu_grad(zc, slope);
              }
            }
          }
        }
      }
      for (int64_t c = 0; c < HC; ++c) gxl[j * HC + c] = static_cast<scalar_t>(acc[c]);
    }
  });
}

void check_all(const at::Tensor& xl, const at::Tensor& xr, const at::Tensor& att,
               const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& eid,
               const std::optional<at::Tensor>& edge_feat, double negative_slope, double dropout,
               const char* op) {
  check_gatv2_inputs(xl, xr, att, rowptr, col, eid, edge_feat, negative_slope, dropout);
  check_csr(rowptr, col, eid, xl.size(0), rowptr.size(0) - 1, op);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gatv2_forward_cpu(
    const at::Tensor& xl, const at::Tensor& xr, const at::Tensor& att, const at::Tensor& rowptr,
    const at::Tensor& col, const at::Tensor& eid, const at::Tensor& colptr,
    const at::Tensor& csc_row, const at::Tensor& csc_perm,
    const std::optional<at::Tensor>& edge_feat, double negative_slope, double dropout,
    const std::optional<at::Tensor>& seed) {
  check_all(xl, xr, att, rowptr, col, eid, edge_feat, negative_slope, dropout,
            "neptune::gatv2_forward");
  const int64_t n_dst = xr.size(0), H = xl.size(1), C = xl.size(2);
  at::Tensor out = at::empty({n_dst, H, C}, xl.options());
  at::Tensor lse = at::empty({n_dst, H}, xl.options().dtype(acc_dtype(xl.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xl.scalar_type(), "gatv2_forward_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(col.scalar_type(), "gatv2_forward_cpu_index", [&] {
      forward_kernel<scalar_t, index_t>(xl, xr, att, rowptr, col, eid, edge_feat, out, lse,
                                        negative_slope, dropout, seed_value(seed, dropout));
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gatv2_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& xl, const at::Tensor& xr, const at::Tensor& att,
    const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& eid,
    const at::Tensor& colptr, const at::Tensor& csc_row, const at::Tensor& csc_perm,
    const std::optional<at::Tensor>& edge_feat, const at::Tensor& out, const at::Tensor& lse,
    double negative_slope, double dropout, const std::optional<at::Tensor>& seed) {
  check_all(xl, xr, att, rowptr, col, eid, edge_feat, negative_slope, dropout,
            "neptune::gatv2_backward");
  check_csc(rowptr, col, eid, colptr, csc_row, csc_perm, xl.size(0), rowptr.size(0) - 1,
            "neptune::gatv2_backward");
  check_gatv2_backward_tensors(grad_out, out, lse, xr);
  const at::Tensor go = grad_out.contiguous();
  at::Tensor gxl = at::empty_like(xl);
  at::Tensor gxr = at::empty_like(xr);
  at::Tensor gatt = at::empty_like(att);
  at::Tensor gef = edge_feat.has_value() ? at::empty_like(*edge_feat) : at::empty({0}, xl.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xl.scalar_type(), "gatv2_backward_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(col.scalar_type(), "gatv2_backward_cpu_index", [&] {
      backward_kernel<scalar_t, index_t>(go, xl, xr, att, rowptr, col, eid, colptr, csc_row,
                                         csc_perm, edge_feat, out.contiguous(), lse.contiguous(),
                                         negative_slope, dropout, seed_value(seed, dropout), gxl,
                                         gxr, gatt, gef);
    });
  });
  return {gxl, gxr, gatt, gef};
}

}  // namespace neptune
