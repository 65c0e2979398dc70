// Fused sparse graph attention on CUDA: the deterministic two-pass backward (see
// attention/common/tree_cuda.cuh for the work layout shared with the forward).
#include "attention/common/tree_cuda.cuh"
#include "attention/gat/gat.h"

namespace neptune {
namespace {

// (dS, a') of one (edge, head), stored together so pass 2 reads them in one access.
template <typename A>
struct alignas(2 * sizeof(A)) DsAp {
  A ds, ap;
};

// ----------------------------------------------------------------------------
// Backward pass 1: destinations. dS_ij = (a'_ij <dOut_i, h_j> - a_ij D_i) * LeakyReLU'.

template <typename scalar_t, typename index_t>
struct Bwd1Params {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* go;
  const scalar_t* h;
  const scalar_t* ss;
  const scalar_t* sd;
  const scalar_t* el;  // nullable
  const scalar_t* out;
  const acc_t* lse;
  const index_t* ptr;  // rowptr
  const index_t* col;
  const index_t* eid;
  DsAp<acc_t>* dsap;   // [E, H], CSR order
  scalar_t* gel;       // nullable, caller order
  scalar_t* gsd;
  acc_t slope, keep_scale;
  float p;
  uint64_t seed;
  bool dropout;
};

template <typename scalar_t, typename index_t, int VEC>
struct Backward1 {
  using acc_t = at::opmath_type<scalar_t>;
  using Params = Bwd1Params<scalar_t, index_t>;
  using Ln = Lanes<1>;
  static constexpr int kU = 4;
  struct State {
    acc_t g;  // sum of dS over the edges seen, for this thread's head
  };

  static int64_t rec_size(const Layout& l) { return l.H; }

  __device__ static Ln lanes(const Layout& l, int tile) {
    return make_lanes<1, true>(l, tile, VEC);
  }

  __device__ static void init(State& st) { st.g = acc_t(0); }

  __device__ static void process(const Params& p, const Layout& l, const Ln& ln, int64_t row,
                                 int64_t lo, int64_t hi, State& st) {
    const bool hok = ln.head_ok[0];
    const int64_t head = ln.head[0];
    const int64_t hoff = head * l.C;
    const scalar_t* go_row = p.go + row * l.HC;
    // D = <dOut_i, out_i> for this head.
    acc_t d = acc_t(0);
    if (hok) {
      for (int64_t v = ln.lih; v < l.VPH; v += l.LPH) {
        const auto a = load_vec<scalar_t, VEC>(go_row + hoff + v * VEC);
        const auto b = load_vec<scalar_t, VEC>(p.out + row * l.HC + hoff + v * VEC);
#pragma unroll
        for (int x = 0; x < VEC; ++x) d += static_cast<acc_t>(a.v[x]) * static_cast<acc_t>(b.v[x]);
      }
    }
    const acc_t D = head_sum(d, ln.mask, l.LPH);
    const acc_t lse = hok ? p.lse[row * l.H + head] : acc_t(0);
    const acc_t base = hok ? static_cast<acc_t>(p.sd[row * l.H + head]) : acc_t(0);
    const bool need_eid = p.el != nullptr || p.dropout;
    for (int64_t chunk = lo; chunk < hi; chunk += l.G) {
      const int n = static_cast<int>(imin(l.G, hi - chunk));
      const EdgeChunk<index_t> edges(p.col, need_eid ? p.eid : nullptr, chunk, n, ln);
      for (int t = 0; t < n; t += kU) {
        int64_t j[kU], e[kU];
        acc_t sv[kU], ev[kU], dot[kU];
        edges.get(ln, t, need_eid, j, e);
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          const bool ok = t + u < n && hok;
          sv[u] = ok ? static_cast<acc_t>(p.ss[j[u] * l.H + head]) : acc_t(0);
          ev[u] = ok && p.el ? static_cast<acc_t>(p.el[e[u] * l.H + head]) : acc_t(0);
          dot[u] = acc_t(0);
        }
        if (hok) {
          for (int64_t v = ln.lih; v < l.VPH; v += l.LPH) {
            const auto gv = load_vec<scalar_t, VEC>(go_row + hoff + v * VEC);
            Vec<scalar_t, VEC> hv[kU];
#pragma unroll
            for (int u = 0; u < kU; ++u)
              hv[u] = t + u < n ? load_vec<scalar_t, VEC>(p.h + j[u] * l.HC + hoff + v * VEC)
                                : zero_vec<scalar_t, VEC>();
#pragma unroll
            for (int u = 0; u < kU; ++u) {
#pragma unroll
              for (int x = 0; x < VEC; ++x)
                dot[u] += static_cast<acc_t>(gv.v[x]) * static_cast<acc_t>(hv[u].v[x]);
            }
          }
        }
#pragma unroll
        for (int u = 0; u < kU; ++u) dot[u] = head_sum(dot[u], ln.mask, l.LPH);
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          if (t + u >= n || !hok) continue;
          acc_t raw = base + sv[u];
          if (p.el) raw += ev[u];
          const acc_t a = acc_exp(leaky_relu(raw, p.slope) - lse);
          acc_t a_kept = a;
          if (p.dropout)
            a_kept = dropout_keep(p.seed, e[u], head, p.p) ? a * p.keep_scale : acc_t(0);
          const acc_t g = a_kept != acc_t(0) ? dot[u] : acc_t(0);
          const acc_t dS = logit_grad(a_kept, g, a, D, raw, p.slope);
          st.g += dS;
          if (ln.leader[0]) {
            const int64_t pos = chunk + t + u;
            DsAp<acc_t> r;
            r.ds = dS;
            r.ap = a_kept;
            p.dsap[pos * l.H + head] = r;
            if (p.gel) p.gel[e[u] * l.H + head] = static_cast<scalar_t>(dS);
          }
        }
      }
    }
  }

  __device__ static void store(const Layout& l, const Ln& ln, const State& st, acc_t* rec) {
    if (ln.leader[0]) rec[ln.head[0]] = st.g;
  }

  __device__ static void combine(const Layout& l, const Ln& ln, const acc_t* rec, State& st) {
    if (ln.head_ok[0]) st.g += rec[ln.head[0]];
  }

  __device__ static void finalize(const Params& p, const Layout& l, const Ln& ln, int64_t row,
                                  const State& st) {
    if (ln.leader[0]) p.gsd[row * l.H + ln.head[0]] = static_cast<scalar_t>(st.g);
  }
};

// ----------------------------------------------------------------------------
// Backward pass 2: sources, over the transposed graph.
//   grad score_src_j = sum_i dS_ij,  grad h_j = sum_i a'_ij dOut_i

template <typename scalar_t, typename index_t>
struct Bwd2Params {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* go;
  const DsAp<acc_t>* dsap;
  const index_t* ptr;   // colptr
  const index_t* row;   // csc_row: destination of each CSC position
  const index_t* perm;  // csc_perm: CSR position of each CSC position
  scalar_t* gh;
  scalar_t* gss;
};

template <typename scalar_t, typename index_t, int VEC, int NSLOT>
struct Backward2 {
  using acc_t = at::opmath_type<scalar_t>;
  using Params = Bwd2Params<scalar_t, index_t>;
  using Ln = Lanes<NSLOT>;
  static constexpr int kU = NSLOT == 1 ? 4 : 2;
  struct State {
    acc_t g[NSLOT], acc[NSLOT][VEC];
  };

  // Record: g [H], acc [H * C].
  static int64_t rec_size(const Layout& l) { return l.H + l.HC; }

  __device__ static Ln lanes(const Layout& l, int tile) {
    return make_lanes<NSLOT, false>(l, tile, VEC);
  }

  __device__ static void init(State& st) {
#pragma unroll
    for (int s = 0; s < NSLOT; ++s) {
      st.g[s] = acc_t(0);
#pragma unroll
      for (int v = 0; v < VEC; ++v) st.acc[s][v] = acc_t(0);
    }
  }

  __device__ static void process(const Params& p, const Layout& l, const Ln& ln, int64_t src,
                                 int64_t lo, int64_t hi, State& st) {
    for (int64_t chunk = lo; chunk < hi; chunk += l.G) {
      const int n = static_cast<int>(imin(l.G, hi - chunk));
      const EdgeChunk<index_t> edges(p.row, p.perm, chunk, n, ln);
      for (int t = 0; t < n; t += kU) {
        int64_t i[kU], q[kU];
        edges.get(ln, t, true, i, q);
        DsAp<acc_t> da[kU][NSLOT];
        Vec<scalar_t, VEC> gv[kU][NSLOT];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
#pragma unroll
          for (int s = 0; s < NSLOT; ++s) {
            const bool ok = t + u < n && ln.head_ok[s];
            if (ok) {
              da[u][s] = p.dsap[q[u] * l.H + ln.head[s]];
            } else {
              da[u][s].ds = acc_t(0);
              da[u][s].ap = acc_t(0);
            }
            gv[u][s] = ok && ln.vec_ok[s] ? load_vec<scalar_t, VEC>(p.go + i[u] * l.HC + ln.c[s])
                                          : zero_vec<scalar_t, VEC>();
          }
        }
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          if (t + u >= n) break;
#pragma unroll
          for (int s = 0; s < NSLOT; ++s) {
            if (!ln.head_ok[s]) continue;
            st.g[s] += da[u][s].ds;
            const acc_t w = da[u][s].ap;
            if (w == acc_t(0) || !ln.vec_ok[s]) continue;
#pragma unroll
            for (int v = 0; v < VEC; ++v) st.acc[s][v] += w * static_cast<acc_t>(gv[u][s].v[v]);
          }
        }
      }
    }
  }

  __device__ static void store(const Layout& l, const Ln& ln, const State& st, acc_t* rec) {
#pragma unroll
    for (int s = 0; s < NSLOT; ++s) {
      if (ln.leader[s]) rec[ln.head[s]] = st.g[s];
      if (ln.vec_ok[s]) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) rec[l.H + ln.c[s] + v] = st.acc[s][v];
      }
    }
  }

  __device__ static void combine(const Layout& l, const Ln& ln, const acc_t* rec, State& st) {
#pragma unroll
    for (int s = 0; s < NSLOT; ++s) {
      if (!ln.head_ok[s]) continue;
      st.g[s] += rec[ln.head[s]];
      if (ln.vec_ok[s]) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) st.acc[s][v] += rec[l.H + ln.c[s] + v];
      }
    }
  }

  __device__ static void finalize(const Params& p, const Layout& l, const Ln& ln, int64_t src,
                                  const State& st) {
#pragma unroll
    for (int s = 0; s < NSLOT; ++s) {
      if (ln.vec_ok[s]) store_vec<scalar_t, VEC>(p.gh + src * l.HC + ln.c[s], st.acc[s], acc_t(1));
      if (ln.leader[s]) p.gss[src * l.H + ln.head[s]] = static_cast<scalar_t>(st.g[s]);
    }
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gat_backward_cuda(
    NEPTUNE_ATTENTION_BACKWARD_PARAMS(h, score_src, score_dst, edge_logits, negative_slope)) {
  check_gat_inputs(h, score_src, score_dst, rowptr, col, eid, edge_logits, negative_slope, dropout);
  const int64_t n_src = h.size(0), n_dst = score_dst.size(0), H = h.size(1), C = h.size(2),
                E = col.size(0);
  check_attention_backward_tensors("neptune::gat_backward", grad_out, out, lse, h.scalar_type(),
                                   {n_dst, H, C}, H);
  check_on_device("neptune::gat_backward",
                  {{h, "h"}, {grad_out, "grad_out"}, {score_src, "score_src"}, {score_dst, "score_dst"},
                   {rowptr, "rowptr"}, {col, "col"}, {eid, "eid"}, {colptr, "colptr"},
                   {csc_row, "csc_row"}, {csc_perm, "csc_perm"}, {out, "out"}, {lse, "lse"}},
                  edge_logits, "edge_logits");
  check_csr(rowptr, col, eid, n_src, n_dst, "neptune::gat_backward");
  check_csc(rowptr, col, eid, colptr, csc_row, csc_perm, n_src, n_dst, "neptune::gat_backward");
  const uint64_t seed_v = seed_value(seed, dropout);
  const c10::cuda::CUDAGuard guard(h.device());

  const at::Tensor go = grad_out.contiguous();
  const at::Tensor out_c = out.contiguous();
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor gh = new_tensor(h.sizes(), h.options());
  at::Tensor gss = new_tensor(score_src.sizes(), h.options());
  at::Tensor gsd = new_tensor(score_dst.sizes(), h.options());
  at::Tensor gel = edge_logits.has_value() ? new_tensor(edge_logits->sizes(), h.options())
                                           : at::empty({0}, h.options());
  if (H == 0) return {gh, gss, gsd, gel};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool vec_ok = aligned16(h) && aligned16(go) && aligned16(out_c) && aligned16(gh);
  // (dS, a') per (CSR position, head): the one E x H intermediate, backward only.
  at::Tensor dsap = new_tensor({E, H, 2}, lse_c.options());

  NEPTUNE_DISPATCH_FLOAT_AND_INDEX(h.scalar_type(), col.scalar_type(), "gat_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = vec_width<scalar_t>();
    DsAp<acc_t>* dsap_p = reinterpret_cast<DsAp<acc_t>*>(dsap.data_ptr<acc_t>());

    Bwd1Params<scalar_t, index_t> p1;
    p1.go = go.data_ptr<scalar_t>();
    p1.h = h.data_ptr<scalar_t>();
    p1.ss = score_src.data_ptr<scalar_t>();
    p1.sd = score_dst.data_ptr<scalar_t>();
    p1.el = edge_logits.has_value() ? edge_logits->data_ptr<scalar_t>() : nullptr;
    p1.out = out_c.data_ptr<scalar_t>();
    p1.lse = lse_c.data_ptr<acc_t>();
    p1.ptr = rowptr.data_ptr<index_t>();
    p1.col = col.data_ptr<index_t>();
    p1.eid = eid.data_ptr<index_t>();
    p1.dsap = dsap_p;
    p1.gel = edge_logits.has_value() ? gel.data_ptr<scalar_t>() : nullptr;
    p1.gsd = gsd.data_ptr<scalar_t>();
    p1.slope = static_cast<acc_t>(negative_slope);
    p1.dropout = dropout > 0.0;
    p1.p = static_cast<float>(dropout);
    p1.keep_scale = dropout_keep_scale<acc_t>(dropout);
    p1.seed = seed_v;
    bool vec1 = false;
    if constexpr (kVec > 1) {
      if (vec_ok && C % kVec == 0) {
        vec1 = true;
        run_tree<Backward1<scalar_t, index_t, kVec>>(p1, make_layout(H, C, kVec, 1, true),
                                                     n_dst, E, lse_c.options(), stream);
      }
    }
    if (!vec1)
      run_tree<Backward1<scalar_t, index_t, 1>>(p1, make_layout(H, C, 1, 1, true), n_dst, E,
                                                lse_c.options(), stream);

    Bwd2Params<scalar_t, index_t> p2;
    p2.go = go.data_ptr<scalar_t>();
    p2.dsap = dsap_p;
    p2.ptr = colptr.data_ptr<index_t>();
    p2.row = csc_row.data_ptr<index_t>();
    p2.perm = csc_perm.data_ptr<index_t>();
    p2.gh = gh.data_ptr<scalar_t>();
    p2.gss = gss.data_ptr<scalar_t>();
    run_wide<Backward2, scalar_t, index_t>(p2, H, C, vec_ok, n_src, E, lse_c.options(), stream);
  });
  return {gh, gss, gsd, gel};
}

}  // namespace neptune
