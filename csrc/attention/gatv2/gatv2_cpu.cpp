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

#include "attention/common/attention_cpu.h"
#include "attention/gatv2/gatv2.h"
#include "attention/common/attention_math.h"

namespace neptune {
namespace {

// The channel loops are `omp simd` loops: the setup's -fno-trapping-math lets GCC turn
// LeakyReLU's selects into blends, and the AVX2 build runs them 8 wide. The reductions' order
// depends on nothing but the code, so results do not change with the run or the thread count.

// The signs of z (z[c] > 0) over n channels as bits: bit c % 32 of words[c / 32].
template <typename acc_t>
inline void pack_signs(const acc_t* z, int64_t n, uint32_t* words) {
  for (int64_t w0 = 0; w0 < n; w0 += 32) {
    const int64_t m = std::min<int64_t>(32, n - w0);
    uint32_t bits = 0;
#pragma omp simd reduction(| : bits)
    for (int64_t c = 0; c < m; ++c) bits |= static_cast<uint32_t>(z[w0 + c] > acc_t(0)) << c;
    words[w0 >> 5] = bits;
  }
}

// Backward pass 1, one head of one edge: gx += d att LeakyReLU'(z), ga += d LeakyReLU(z)
// (t: LeakyReLU(z)), gef = d att LeakyReLU'(z) (when gef is given).
template <typename scalar_t, typename acc_t>
inline void dst_update(acc_t* gx, acc_t* ga, scalar_t* gef, const acc_t* z, const acc_t* t,
                       const acc_t* att, acc_t d, int64_t C, acc_t slope) {
  if (gef) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const acc_t gz = att[c] * leaky_relu_grad(z[c], slope) * d;
      gx[c] += gz;
      ga[c] += t[c] * d;
      gef[c] = static_cast<scalar_t>(gz);
    }
  } else {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      gx[c] += att[c] * leaky_relu_grad(z[c], slope) * d;
      ga[c] += t[c] * d;
    }
  }
}

// Backward pass 2, one head of one edge (channels c0 .. c0 + C of the row):
// acc += w dOut_i + d att LeakyReLU'(z), LeakyReLU'(z) from the signs of z that pass 1 saved
// (pack_signs: E x H x C bits, so that pass 2 gathers neither x_r[i] nor edge_feat): the
// channels in runs that share a sign word (32 at most), each run's bits from its word by a
// shift per lane.
template <typename scalar_t, typename acc_t>
inline void src_update(acc_t* acc, const uint32_t* signs, int64_t c0, const scalar_t* go,
                       const acc_t* att, acc_t w, acc_t d, int64_t C, acc_t slope) {
  for (int64_t c = 0; c < C;) {
    const int64_t g = c0 + c;
    const int64_t n = std::min<int64_t>(C - c, 32 - (g & 31));
    const uint32_t word = signs[g >> 5] >> (g & 31);
    acc_t* a = acc + c;
    const scalar_t* gr = go + c;
    const acc_t* at = att + c;
#pragma omp simd
    for (int64_t u = 0; u < n; ++u) {
      const acc_t lg = (word >> u) & 1u ? acc_t(1) : slope;
      a[u] = a[u] + static_cast<acc_t>(gr[u]) * w + at[u] * lg * d;
    }
    c += n;
  }
}

// t = LeakyReLU(x_l[j] + x_r[i] (+ edge_feat[e])) over the n = H * C channels of an edge
// (x_r[i] already in the accumulation type).
template <typename scalar_t, typename acc_t>
inline void leaky_terms(const scalar_t* xlj, const acc_t* xri, const scalar_t* efe, int64_t n,
                        acc_t slope, acc_t* t) {
  if (efe) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c)
      t[c] = leaky_relu(static_cast<acc_t>(xlj[c]) + xri[c] + static_cast<acc_t>(efe[c]), slope);
  } else {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) t[c] = leaky_relu(static_cast<acc_t>(xlj[c]) + xri[c], slope);
  }
}

// GATv2's logit and value for the shared forward pass (attention_cpu.h):
//   logit_ij = <att, LeakyReLU(x_l[j] + x_r[i] (+ edge_feat[e]))>, value_ij = x_l[j].
template <typename scalar_t, typename acc_t>
struct Gatv2Forward {
  const scalar_t* xl;
  const scalar_t* xr;
  const scalar_t* ef;
  std::vector<acc_t> att;  // in the accumulation type
  int64_t H, C;
  acc_t slope;
  int64_t edge_cost = 2;
  // the row's scratch: x_r[i], then an edge's LeakyReLU(x_l[j] + x_r[i] (+ edge_feat[e]))
  int64_t row_size() const { return 2 * H * C; }
  void begin_row(acc_t* xri, int64_t i) const { load_scaled(xri, xr + i * H * C, acc_t(1), H * C); }
  void prefetch(int64_t j, int64_t edge) const {
    prefetch_row(xl + j * H * C, H * C);
    if (ef) prefetch_row(ef + edge * H * C, H * C);
  }
  void logits(acc_t* row, int64_t j, int64_t edge, acc_t* x) const {
    const int64_t HC = H * C;
    leaky_terms(xl + j * HC, row, ef ? ef + edge * HC : nullptr, HC, slope, row + HC);
    head_dots<acc_t>(att.data(), row + HC, H, C, x);
  }
  void accumulate(acc_t* a, acc_t rescale, acc_t w, int64_t j, int64_t, int64_t k) const {
    axpy_rescaled<scalar_t, acc_t>(a, rescale, w, xl + (j * H + k) * C, nullptr, C);
  }
};

// att in the accumulation type.
template <typename scalar_t, typename acc_t>
std::vector<acc_t> att_values(const at::Tensor& att_t) {
  std::vector<acc_t> att(att_t.numel());
  load_scaled(att.data(), att_t.data_ptr<scalar_t>(), acc_t(1), att_t.numel());
  return att;
}

template <typename scalar_t, typename index_t>
void backward_kernel(const BackwardCommon<scalar_t, index_t>& b, const at::Tensor& xl_t,
                     const at::Tensor& xr_t, const at::Tensor& att_t,
                     const std::optional<at::Tensor>& ef_t, double slope_d, at::Tensor& gxl_t,
                     at::Tensor& gxr_t, at::Tensor& gatt_t, at::Tensor& gef_t) {
  using acc_t = at::opmath_type<scalar_t>;
  NEPTUNE_UNPACK_BACKWARD(b);
  const auto [H, C] = gatv2_heads(att_t);
  const int64_t n_src = xl_t.size(0), n_dst = xr_t.size(0), HC = H * C;
  const scalar_t* xl = xl_t.data_ptr<scalar_t>();
  const scalar_t* xr = xr_t.data_ptr<scalar_t>();
  const scalar_t* ef = data_or_null<scalar_t>(ef_t);
  scalar_t* gxl = gxl_t.data_ptr<scalar_t>();
  scalar_t* gxr = gxr_t.data_ptr<scalar_t>();
  scalar_t* gef = ef ? gef_t.data_ptr<scalar_t>() : nullptr;
  const acc_t slope = static_cast<acc_t>(slope_d);
  const std::vector<acc_t> att = att_values<scalar_t, acc_t>(att_t);

  // Per-edge dS and a' in CSR order (E x H scratch, backward only).
  at::Tensor ds_t = empty_cpu({E, H}, b.scratch);
  at::Tensor ap_t = empty_cpu({E, H}, b.scratch);
  acc_t* ds = ds_t.data_ptr<acc_t>();
  acc_t* ap = ap_t.data_ptr<acc_t>();
  const int64_t W = (HC + 31) / 32;  // sign words per edge
  at::Tensor signs_t = empty_cpu({E * W}, b.scratch.dtype(at::kInt));
  uint32_t* signs = reinterpret_cast<uint32_t*>(signs_t.data_ptr<int32_t>());
  const int64_t n_blocks = (n_dst + kGatv2AttBlock - 1) / kGatv2AttBlock;
  at::Tensor part_t = at::zeros({std::max<int64_t>(n_blocks, 1), HC}, b.scratch);
  acc_t* part = part_t.data_ptr<acc_t>();

  // Pass 1: destinations, in fixed blocks.
  const int64_t block_grain = std::max<int64_t>(1, grain_for(n_dst, E, HC, 16384) / kGatv2AttBlock);
  parallel_for_isa(0, n_blocks, block_grain, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> zv(HC), tv(HC), xri(HC), gxri(HC), D(H), dS(H), xv(H), av(H), gv(H);
    acc_t* z = zv.data();
    acc_t* t = tv.data();
    acc_t* xs = xv.data();
    acc_t* as = av.data();
    acc_t* gs = gv.data();
    for (int64_t b = b0; b < b1; ++b) {
      acc_t* ga = part + b * HC;
      const int64_t i_end = std::min(n_dst, (b + 1) * kGatv2AttBlock);
      for (int64_t i = b * kGatv2AttBlock; i < i_end; ++i) {
        const scalar_t* goi = go + i * HC;
        const acc_t* lsei = lse + i * H;
        load_scaled(xri.data(), xr + i * HC, acc_t(1), HC);
        std::fill(gxri.begin(), gxri.end(), acc_t(0));
        row_dots(goi, out + i * HC, H, C, D.data());
        for (int64_t e = csr.rowptr[i]; e < csr.rowptr[i + 1]; ++e) {
          if (e + kPrefetchDistance < E) {
            prefetch_row(xl + static_cast<int64_t>(csr.col[e + kPrefetchDistance]) * HC, HC);
            if (ef) prefetch_row(ef + static_cast<int64_t>(csr.eid[e + kPrefetchDistance]) * HC, HC);
          }
          const int64_t j = csr.col[e], edge = csr.eid[e];
          const scalar_t* xlj = xl + j * HC;
          const scalar_t* efe = ef ? ef + edge * HC : nullptr;
          // z, LeakyReLU(z), z's signs, the logits and weights of every head (vector loops)
          if (efe) {
#pragma omp simd
            for (int64_t c = 0; c < HC; ++c)
              z[c] = static_cast<acc_t>(xlj[c]) + xri[c] + static_cast<acc_t>(efe[c]);
          } else {
#pragma omp simd
            for (int64_t c = 0; c < HC; ++c) z[c] = static_cast<acc_t>(xlj[c]) + xri[c];
          }
#pragma omp simd
          for (int64_t c = 0; c < HC; ++c) t[c] = leaky_relu(z[c], slope);
          pack_signs(z, HC, signs + e * W);
          head_dots<acc_t>(att.data(), t, H, C, xs);
#pragma omp simd
          for (int64_t k = 0; k < H; ++k) as[k] = exp_acc(xs[k] - lsei[k]);
          head_dots<acc_t>(goi, xlj, H, C, gs);  // <dOut_i, x_l[j]> per head
          bool any = false;
          for (int64_t k = 0; k < H; ++k) {
            const acc_t a = as[k];
            const acc_t a_kept = drop.apply(a, edge, k);
            const acc_t gk = a_kept != acc_t(0) ? gs[k] : acc_t(0);
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
            dst_update<scalar_t, acc_t>(gxri.data() + k * C, ga + k * C, gefe ? gefe + k * C : nullptr,
                                        z + k * C, t + k * C, att.data() + k * C, dS[k], C, slope);
          }
        }
        for (int64_t c = 0; c < HC; ++c) gxr[i * HC + c] = static_cast<scalar_t>(gxri[c]);
      }
    }
  });
  // Edges of the ignored rows (>= n_dst): zero gradient.
  if (gef && csr.n_rows > n_dst) {
    for (int64_t e = csr.rowptr[n_dst]; e < E; ++e)
      std::fill(gef + static_cast<int64_t>(csr.eid[e]) * HC, gef + (static_cast<int64_t>(csr.eid[e]) + 1) * HC,
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

  // Pass 2: sources, over the transposed graph. Only dOut_i (and the saved signs)
  // are gathered per edge.
  parallel_rows_by_cost(csc.colptr, n_src, HC, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(HC);
    for (int64_t j = begin; j < end; ++j) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t t = csc.colptr[j]; t < csc.colptr[j + 1]; ++t) {
        if (t + kPrefetchDistance < E) {
          const int64_t in = csc.row[t + kPrefetchDistance];
          if (in < n_dst) {
            const int64_t en = csc.perm[t + kPrefetchDistance];
            prefetch_row(go + in * HC, HC);
            __builtin_prefetch(ds + en * H, 0, 1);
            __builtin_prefetch(ap + en * H, 0, 1);
            __builtin_prefetch(signs + en * W, 0, 1);
          }
        }
        const int64_t i = csc.row[t];
        if (i >= n_dst) continue;
        const int64_t e = csc.perm[t];
        const scalar_t* goi = go + i * HC;
        for (int64_t k = 0; k < H; ++k) {
          const acc_t w = ap[e * H + k], d = ds[e * H + k];
          if (w == acc_t(0) && d == acc_t(0)) continue;
          src_update<scalar_t, acc_t>(acc.data() + k * C, signs + e * W, k * C, goi + k * C,
                                      att.data() + k * C, w, d, C, slope);
        }
      }
      for (int64_t c = 0; c < HC; ++c) gxl[j * HC + c] = static_cast<scalar_t>(acc[c]);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gatv2_forward_cpu(
    NEPTUNE_ATTENTION_FORWARD_PARAMS(xl, xr, att, edge_feat, negative_slope)) {
  check_gatv2_entry(xl, xr, att, rowptr, col, eid, edge_feat, negative_slope, dropout,
                    "neptune::gatv2_forward");
  const auto [H, C] = gatv2_heads(att);
  return attention_forward_cpu(xl, xr.sizes(), H, rowptr, col, eid, dropout, seed, [&](auto* type) {
    using scalar_t = std::remove_pointer_t<decltype(type)>;
    using acc_t = at::opmath_type<scalar_t>;
    return Gatv2Forward<scalar_t, acc_t>{xl.data_ptr<scalar_t>(), xr.data_ptr<scalar_t>(),
                                         data_or_null<scalar_t>(edge_feat),
                                         att_values<scalar_t, acc_t>(att), H, C,
                                         static_cast<acc_t>(negative_slope)};
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gatv2_backward_cpu(
    NEPTUNE_ATTENTION_BACKWARD_PARAMS(xl, xr, att, edge_feat, negative_slope)) {
  check_gatv2_entry(xl, xr, att, rowptr, col, eid, edge_feat, negative_slope, dropout,
                    "neptune::gatv2_backward");
  check_csc(rowptr, col, eid, colptr, csc_row, csc_perm, xl.size(0), rowptr.size(0) - 1,
            "neptune::gatv2_backward");
  check_attention_backward_tensors("neptune::gatv2_backward", grad_out, out, lse, xr.scalar_type(),
                                   xr.sizes(), gatv2_heads(att).first);
  at::Tensor gxl = empty_like_cpu(xl);
  at::Tensor gxr = empty_like_cpu(xr);
  at::Tensor gatt = at::empty_like(att);
  at::Tensor gef = edge_feat.has_value() ? empty_like_cpu(*edge_feat) : at::empty({0}, xl.options());
  NEPTUNE_DISPATCH_FLOAT_AND_INDEX(xl.scalar_type(), col.scalar_type(), "gatv2_backward_cpu", [&] {
    backward_kernel<scalar_t, index_t>(NEPTUNE_BACKWARD_COMMON, xl, xr, att, edge_feat,
                                       negative_slope, gxl, gxr, gatt, gef);
  });
  return {gxl, gxr, gatt, gef};
}

}  // namespace neptune
