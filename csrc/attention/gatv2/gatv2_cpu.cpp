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
#include <cstring>
#include <type_traits>
#include <vector>

#include "attention/common/attention_cpu.h"
#include "attention/gatv2/gatv2.h"
#include "attention/common/attention_math.h"

namespace neptune {
namespace {

// float32 inner loops in explicit 4-wide vectors (GCC/Clang vector extensions; SSE
// on any x86-64), written when GCC's auto-vectorizer left LeakyReLU's select a branch
// (that was its default -ftrapping-math; the setup now passes -fno-trapping-math, so
// plain `omp simd` loops would vectorize too, and 8 wide in the AVX2 build). The
// reductions' order depends on nothing but the code, so results do not change with the
// run or the thread count. Other dtypes take the scalar loops.
#pragma GCC diagnostic ignored "-Wpsabi"  // the helpers below are internal: no ABI to keep
typedef float v4f __attribute__((vector_size(16)));

inline v4f load4(const float* p) {
  v4f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store4(float* p, v4f v) { std::memcpy(p, &v, sizeof(v)); }
inline float hsum4(v4f v) { return (v[0] + v[1]) + (v[2] + v[3]); }
inline v4f leaky4(v4f z, v4f slope) {
  const v4f neg = z * slope;
  const v4f zero = {};
  return z > zero ? z : neg;
}
inline v4f leaky_grad4(v4f z, v4f one, v4f slope) {
  const v4f zero = {};
  return z > zero ? one : slope;
}
inline v4f splat4(float x) { return v4f{x, x, x, x}; }

// The logit of one head: sum_c att[c] * LeakyReLU(x_l[c] + x_r[c] (+ ef[c])). With
// STORE_Z (backward), z is also written to z_out and its signs (z > 0) are OR-ed into
// the edge's sign words at bits c0 + c (the words start zeroed).
template <bool STORE_Z, typename scalar_t, typename acc_t>
inline acc_t head_logit(const scalar_t* xl, const acc_t* xr, const scalar_t* ef, const acc_t* att,
                        int64_t C, acc_t slope, acc_t* z_out, uint32_t* signs, int64_t c0) {
  acc_t s = 0;
  int64_t c = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (!STORE_Z || c0 % 4 == 0) {
      typedef int v4i __attribute__((vector_size(16)));
      const v4f sl = splat4(slope), zero = {};
      const v4i lane_bit = {1, 2, 4, 8};
      v4f acc = {};
      for (; c + 4 <= C; c += 4) {
        v4f z = load4(xl + c) + load4(xr + c);
        if (ef) z += load4(ef + c);
        if constexpr (STORE_Z) {
          store4(z_out + c, z);
          const v4i m = (z > zero) & lane_bit;
          const int64_t g = c0 + c;
          signs[g >> 5] |= static_cast<uint32_t>((m[0] | m[1]) | (m[2] | m[3])) << (g & 31);
        }
        acc += load4(att + c) * leaky4(z, sl);
      }
      s = hsum4(acc);
    }
  }
  for (; c < C; ++c) {
    acc_t z = static_cast<acc_t>(xl[c]) + xr[c];
    if (ef) z += static_cast<acc_t>(ef[c]);
    if constexpr (STORE_Z) {
      z_out[c] = z;
      const int64_t g = c0 + c;
      signs[g >> 5] |= static_cast<uint32_t>(z > acc_t(0)) << (g & 31);
    }
    s += att[c] * leaky_relu(z, slope);
  }
  return s;
}

template <typename scalar_t, typename acc_t>
inline acc_t dot(const scalar_t* a, const scalar_t* b, int64_t C) {
  acc_t s = 0;
  int64_t c = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    v4f acc = {};
    for (; c + 4 <= C; c += 4) acc += load4(a + c) * load4(b + c);
    s = hsum4(acc);
  }
  for (; c < C; ++c) s += static_cast<acc_t>(a[c]) * static_cast<acc_t>(b[c]);
  return s;
}

// Backward pass 1, one head of one edge: gx += d att LeakyReLU'(z), ga += d LeakyReLU(z),
// gef = d att LeakyReLU'(z) (when gef is given).
template <typename scalar_t, typename acc_t>
inline void dst_update(acc_t* gx, acc_t* ga, scalar_t* gef, const acc_t* z, const acc_t* att, acc_t d,
                       int64_t C, acc_t slope) {
  int64_t c = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    const v4f sl = splat4(slope), one = splat4(1.0f), dv = splat4(d);
    for (; c + 4 <= C; c += 4) {
      const v4f zc = load4(z + c);
      const v4f gz = load4(att + c) * leaky_grad4(zc, one, sl) * dv;
      store4(gx + c, load4(gx + c) + gz);
      store4(ga + c, load4(ga + c) + leaky4(zc, sl) * dv);
      if (gef) store4(gef + c, gz);
    }
  }
  for (; c < C; ++c) {
    const acc_t gz = att[c] * leaky_relu_grad(z[c], slope) * d;
    gx[c] += gz;
    ga[c] += leaky_relu(z[c], slope) * d;
    if (gef) gef[c] = static_cast<scalar_t>(gz);
  }
}

// The signs of z (bit c of an edge's words: z[c] > 0) are saved by pass 1 (see
// head_logit), so that pass 2 gets LeakyReLU'(z) without gathering x_r[i] and
// edge_feat again: E x H x C bits.
inline bool sign_bit(const uint32_t* words, int64_t c) { return (words[c >> 5] >> (c & 31)) & 1u; }

// Backward pass 2, one head of one edge (channels c0 .. c0 + C of the row):
// acc += w dOut_i + d att LeakyReLU'(z), LeakyReLU'(z) from the saved signs.
template <typename scalar_t, typename acc_t>
inline void src_update(acc_t* acc, const uint32_t* signs, int64_t c0, const scalar_t* go,
                       const acc_t* att, acc_t w, acc_t d, int64_t C, acc_t slope) {
  int64_t c = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (c0 % 4 == 0) {
      // LeakyReLU' of 4 channels from their 4 sign bits: a 16-entry table.
      v4f table[16];
      for (int n = 0; n < 16; ++n)
        for (int l = 0; l < 4; ++l) table[n][l] = (n >> l & 1) ? 1.0f : slope;
      const v4f wv = splat4(w), dv = splat4(d);
      for (; c + 4 <= C; c += 4) {
        const int64_t g = c0 + c;
        const uint32_t nib = (signs[g >> 5] >> (g & 31)) & 0xFu;
        store4(acc + c, load4(acc + c) + load4(go + c) * wv + load4(att + c) * table[nib] * dv);
      }
    }
  }
  for (; c < C; ++c)
    acc[c] += static_cast<acc_t>(go[c]) * w + att[c] * (sign_bit(signs, c0 + c) ? acc_t(1) : slope) * d;
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
  int64_t row_size() const { return H * C; }  // the row's scratch: x_r[i]
  void begin_row(acc_t* xri, int64_t i) const { load_scaled(xri, xr + i * H * C, acc_t(1), H * C); }
  void prefetch(int64_t j, int64_t edge) const {
    prefetch_row(xl + j * H * C, H * C);
    if (ef) prefetch_row(ef + edge * H * C, H * C);
  }
  acc_t logit(const acc_t* xri, int64_t j, int64_t edge, int64_t k) const {
    const int64_t o = k * C;
    return head_logit<false, scalar_t, acc_t>(xl + j * H * C + o, xri + o,
                                              ef ? ef + edge * H * C + o : nullptr, att.data() + o, C,
                                              slope, nullptr, nullptr, 0);
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
    std::vector<acc_t> z(HC), xri(HC), gxri(HC), D(H), dS(H);
    for (int64_t b = b0; b < b1; ++b) {
      acc_t* ga = part + b * HC;
      const int64_t i_end = std::min(n_dst, (b + 1) * kGatv2AttBlock);
      for (int64_t i = b * kGatv2AttBlock; i < i_end; ++i) {
        const scalar_t* goi = go + i * HC;
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
          bool any = false;
          uint32_t* sg = signs + e * W;
          std::fill(sg, sg + W, 0u);
          for (int64_t k = 0; k < H; ++k) {
            const acc_t x = head_logit<true, scalar_t, acc_t>(
                xlj + k * C, xri.data() + k * C, efe ? efe + k * C : nullptr, att.data() + k * C, C,
                slope, z.data() + k * C, sg, k * C);
            const acc_t a = std::exp(x - lse[i * H + k]);
            const acc_t a_kept = drop.apply(a, edge, k);
            const acc_t gk = a_kept != acc_t(0) ? dot<scalar_t, acc_t>(goi + k * C, xlj + k * C, C) : acc_t(0);
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
                                        z.data() + k * C, att.data() + k * C, dS[k], C, slope);
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
  const at::Tensor go = dense_cpu(grad_out), out_c = out.contiguous(), lse_c = lse.contiguous();
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
