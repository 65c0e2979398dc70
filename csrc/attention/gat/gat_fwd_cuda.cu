// Fused sparse graph attention on CUDA: the forward (see attention/common/tree_cuda.cuh
// for the work layout shared with the backward).
#include "attention/common/tree_cuda.cuh"
#include "attention/gat/gat.h"

namespace neptune {
namespace {

// ----------------------------------------------------------------------------
// Forward: online softmax over the in-edges of a destination.

template <typename scalar_t, typename index_t>
struct FwdParams {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* h;
  const scalar_t* ss;
  const scalar_t* sd;
  const scalar_t* el;  // nullable
  const index_t* ptr;  // rowptr
  const index_t* col;
  const index_t* eid;
  scalar_t* out;
  acc_t* lse;
  acc_t slope, keep_scale;
  float p;
  uint64_t seed;
  bool dropout;
};

template <typename scalar_t, typename index_t, int VEC, int NSLOT>
struct Forward {
  using acc_t = at::opmath_type<scalar_t>;
  using Params = FwdParams<scalar_t, index_t>;
  using Ln = Lanes<NSLOT>;
  static constexpr int kU = NSLOT == 1 ? 4 : 2;  // edges whose rows are loaded together
  struct State {
    acc_t m[NSLOT], s[NSLOT], acc[NSLOT][VEC];
  };

  // Record: m [H], s [H], acc [H * C].
  static int64_t rec_size(const Layout& l) { return 2 * l.H + l.HC; }

  __device__ static Ln lanes(const Layout& l, int tile) {
    return make_lanes<NSLOT, false>(l, tile, VEC);
  }

  __device__ static void init(State& st) {
#pragma unroll
    for (int s = 0; s < NSLOT; ++s) {
      st.m[s] = -std::numeric_limits<acc_t>::infinity();
      st.s[s] = acc_t(0);
#pragma unroll
      for (int v = 0; v < VEC; ++v) st.acc[s][v] = acc_t(0);
    }
  }

  __device__ static void process(const Params& p, const Layout& l, const Ln& ln, int64_t row,
                                 int64_t lo, int64_t hi, State& st) {
    acc_t base[NSLOT];
#pragma unroll
    for (int s = 0; s < NSLOT; ++s)
      base[s] = ln.head_ok[s] ? static_cast<acc_t>(p.sd[row * l.H + ln.head[s]]) : acc_t(0);
    const bool need_eid = p.el != nullptr || p.dropout;
    for (int64_t chunk = lo; chunk < hi; chunk += l.G) {
      const int n = static_cast<int>(imin(l.G, hi - chunk));
      const EdgeChunk<index_t> edges(p.col, need_eid ? p.eid : nullptr, chunk, n, ln);
      for (int t = 0; t < n; t += kU) {
        int64_t j[kU], e[kU];
        edges.get(ln, t, need_eid, j, e);
        // Issue every load of the kU edges before the first use.
        acc_t sv[kU][NSLOT], ev[kU][NSLOT];
        Vec<scalar_t, VEC> hv[kU][NSLOT];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
#pragma unroll
          for (int s = 0; s < NSLOT; ++s) {
            const bool ok = t + u < n && ln.head_ok[s];
            sv[u][s] = ok ? static_cast<acc_t>(p.ss[j[u] * l.H + ln.head[s]]) : acc_t(0);
            ev[u][s] = ok && p.el ? static_cast<acc_t>(p.el[e[u] * l.H + ln.head[s]]) : acc_t(0);
            hv[u][s] = ok && ln.vec_ok[s] ? load_vec<scalar_t, VEC>(p.h + j[u] * l.HC + ln.c[s])
                                          : zero_vec<scalar_t, VEC>();
          }
        }
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          if (t + u >= n) break;
#pragma unroll
          for (int s = 0; s < NSLOT; ++s) {
            if (!ln.head_ok[s]) continue;
            acc_t raw = base[s] + sv[u][s];
            if (p.el) raw += ev[u][s];
            const acc_t x = leaky_relu(raw, p.slope);
            acc_t rescale, w;
            online_softmax_step(x, st.m[s], st.s[s], rescale, w);
            if (p.dropout)
              w = dropout_keep(p.seed, e[u], ln.head[s], p.p) ? w * p.keep_scale : acc_t(0);
            if (rescale != acc_t(1)) {
#pragma unroll
              for (int v = 0; v < VEC; ++v)
                st.acc[s][v] = st.acc[s][v] * rescale + w * static_cast<acc_t>(hv[u][s].v[v]);
            } else {
#pragma unroll
              for (int v = 0; v < VEC; ++v) st.acc[s][v] += w * static_cast<acc_t>(hv[u][s].v[v]);
            }
          }
        }
      }
    }
  }

  __device__ static void store(const Layout& l, const Ln& ln, const State& st, acc_t* rec) {
#pragma unroll
    for (int s = 0; s < NSLOT; ++s) {
      if (ln.leader[s]) {
        rec[ln.head[s]] = st.m[s];
        rec[l.H + ln.head[s]] = st.s[s];
      }
      if (ln.vec_ok[s]) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) rec[2 * l.H + ln.c[s] + v] = st.acc[s][v];
      }
    }
  }

  __device__ static void combine(const Layout& l, const Ln& ln, const acc_t* rec, State& st) {
#pragma unroll
    for (int s = 0; s < NSLOT; ++s) {
      if (!ln.head_ok[s]) continue;
      acc_t m, sum, f1, f2;
      online_softmax_merge(st.m[s], st.s[s], rec[ln.head[s]], rec[l.H + ln.head[s]], m, sum, f1,
                           f2);
      if (ln.vec_ok[s]) {
#pragma unroll
        for (int v = 0; v < VEC; ++v)
          st.acc[s][v] = st.acc[s][v] * f1 + rec[2 * l.H + ln.c[s] + v] * f2;
      }
      st.m[s] = m;
      st.s[s] = sum;
    }
  }

  __device__ static void finalize(const Params& p, const Layout& l, const Ln& ln, int64_t row,
                                  const State& st) {
#pragma unroll
    for (int s = 0; s < NSLOT; ++s) {
      const bool any = softmax_has_mass(st.s[s]);
      if (ln.vec_ok[s])
        store_vec<scalar_t, VEC>(p.out + row * l.HC + ln.c[s], st.acc[s],
                                 any ? acc_t(1) / st.s[s] : acc_t(0));
      if (ln.leader[s])
        p.lse[row * l.H + ln.head[s]] = any ? st.m[s] + acc_log(st.s[s]) : acc_t(0);
    }
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> gat_forward_cuda(
    NEPTUNE_ATTENTION_FORWARD_PARAMS(h, score_src, score_dst, edge_logits, negative_slope)) {
  check_gat_inputs(h, score_src, score_dst, rowptr, col, eid, edge_logits, negative_slope, dropout);
  check_on_device("neptune::gat_forward", {{h, "h"}, {score_src, "score_src"}, {score_dst, "score_dst"},
                  {rowptr, "rowptr"}, {col, "col"}, {eid, "eid"}}, edge_logits, "edge_logits");
  check_csr(rowptr, col, eid, h.size(0), score_dst.size(0), "neptune::gat_forward");
  const uint64_t seed_v = seed_value(seed, dropout);
  const c10::cuda::CUDAGuard guard(h.device());

  const int64_t n_dst = score_dst.size(0), H = h.size(1), C = h.size(2), E = col.size(0);
  at::Tensor out = new_tensor({n_dst, H, C}, h.options());
  at::Tensor lse = new_tensor({n_dst, H}, h.options().dtype(acc_dtype(h.scalar_type())));
  if (n_dst == 0 || H == 0) return {out, lse};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool vec_ok = aligned16(h) && aligned16(out);

  NEPTUNE_DISPATCH_FLOAT_AND_INDEX(h.scalar_type(), col.scalar_type(), "gat_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FwdParams<scalar_t, index_t> p;
    p.h = h.data_ptr<scalar_t>();
    p.ss = score_src.data_ptr<scalar_t>();
    p.sd = score_dst.data_ptr<scalar_t>();
    p.el = edge_logits.has_value() ? edge_logits->data_ptr<scalar_t>() : nullptr;
    p.ptr = rowptr.data_ptr<index_t>();
    p.col = col.data_ptr<index_t>();
    p.eid = eid.data_ptr<index_t>();
    p.out = out.data_ptr<scalar_t>();
    p.lse = lse.data_ptr<acc_t>();
    p.slope = static_cast<acc_t>(negative_slope);
    p.dropout = dropout > 0.0;
    p.p = static_cast<float>(dropout);
    p.keep_scale = dropout_keep_scale<acc_t>(dropout);
    p.seed = seed_v;
    run_wide<Forward, scalar_t, index_t>(p, H, C, vec_ok, n_dst, E, lse.options(), stream);
  });
  return {out, lse};
}

}  // namespace neptune
