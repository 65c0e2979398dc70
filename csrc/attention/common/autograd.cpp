// Autograd for every fused attention op (GAT, GAT with its attention vectors, GATv2,
// graph transformer), in C++.
//
// The attention ops share one calling convention (neptune_ext/attention/spec.py):
//
//   <name>_forward(a, b, c, rowptr, col, eid, colptr, csc_row, csc_perm, edge, scalar,
//                  dropout, seed) -> (out, lse)
//   <name>_backward(grad_out, a, b, c, rowptr, col, eid, colptr, csc_row, csc_perm, edge,
//                   out, lse, scalar, dropout, seed) -> (grad_a, grad_b, grad_c, grad_edge)
//
// so one autograd function serves them all: registered at the Autograd key, it runs the
// forward kernel, saves its inputs, out and the log-sum-exp, and its backward is one call of
// the backward kernel - no Python on the training step. A backward that builds a graph
// (create_graph=True) cannot differentiate the kernels, so it calls
// neptune::attention_grads_reference, which neptune_ext implements in Python from the
// differentiable pure-PyTorch reference: double backward stays exact.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/SymBool.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <string>
#include <tuple>


namespace neptune {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                              const Tensor&, const Tensor&, const Tensor&,
                                              const Tensor&, const Tensor&, const Tensor&,
                                              const OptTensor&, double, double, const OptTensor&);
using BackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
    const Tensor&, double, double, const OptTensor&);
using ReferenceSig = std::vector<Tensor>(c10::string_view, const Tensor&, const Tensor&,
                                         const Tensor&, const Tensor&, const Tensor&,
                                         const Tensor&, const Tensor&, const OptTensor&, double,
                                         double, const OptTensor&);

// A variant: its op family, which of (a, b, c) holds the source nodes (the transposed
// graph has one column per source), and the Python function users call.
struct Variant {
  const char* name;
  int src_input;
  const char* entry;
};
constexpr Variant kGat{"gat", 0, "neptune_ext.ops.sparse_graph_attention"};           // h
constexpr Variant kGatAtt{"gat_att", 0, "neptune_ext.nn.GraphAttention"};             // h
constexpr Variant kGatv2{"gatv2", 0, "neptune_ext.ops.gatv2_attention"};              // x_l
constexpr Variant kTransformer{"transformer", 1, "neptune_ext.ops.transformer_attention"};  // k
constexpr Variant kTransformerEdge{"transformer_edge", 1,
                                   "neptune_ext.ops.transformer_edge_attention"};  // kv

// The op neptune::<name>, looked up once.
template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const std::string& name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(("neptune::" + name).c_str(), "").template typed<Sig>();
}

template <const Variant& V>
const c10::TypedOperatorHandle<ForwardSig>& forward_op() {
  static const auto op = find_op<ForwardSig>(std::string(V.name) + "_forward");
  return op;
}

template <const Variant& V>
const c10::TypedOperatorHandle<BackwardSig>& backward_op() {
  static const auto op = find_op<BackwardSig>(std::string(V.name) + "_backward");
  return op;
}

const c10::TypedOperatorHandle<ReferenceSig>& reference_op() {
  static const auto op = find_op<ReferenceSig>("attention_grads_reference");
  return op;
}

inline OptTensor optional(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

template <const Variant& V>
struct AttentionFunction : public torch::autograd::Function<AttentionFunction<V>> {
  static variable_list forward(AutogradContext* ctx, const Tensor& a, const Tensor& b,
                               const Tensor& c, const Tensor& rowptr, const Tensor& col,
                               const Tensor& eid, const Tensor& colptr, const Tensor& csc_row,
                               const Tensor& csc_perm, const OptTensor& edge, double scalar,
                               double dropout, const OptTensor& seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = forward_op<V>().call(a, b, c, rowptr, col, eid, colptr, csc_row, csc_perm,
                                           edge, scalar, dropout, seed);
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);  // no zeros for lse's (absent) gradient
    ctx->save_for_backward({a, b, c, rowptr, col, eid, colptr, csc_row, csc_perm,
                            edge.value_or(Tensor()), out, lse, seed.value_or(Tensor())});
    ctx->saved_data["scalar"] = scalar;
    ctx->saved_data["dropout"] = dropout;
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const Tensor &a = s[0], &b = s[1], &c = s[2], &rowptr = s[3], &col = s[4], &eid = s[5];
    const Tensor &colptr = s[6], &csc_row = s[7], &csc_perm = s[8], &edge = s[9];
    const Tensor &out = s[10], &lse = s[11], &seed = s[12];
    const double scalar = ctx->saved_data["scalar"].toDouble();
    const double dropout = ctx->saved_data["dropout"].toDouble();
    // The kernels read a dense grad_out. The CPU entries make their own dense copy (one from
    // a sum or mean is an expanded view, as large as out once dense: they take it from the
    // buffer cache); elsewhere it is made here. Not here for the CPU: under torch.compile
    // and make_fx this runs on fake tensors, which only the dispatcher may allocate.
    const Tensor grad_out = !grads[0].defined() ? at::zeros_like(out)
                            : grads[0].is_cpu() ? grads[0]
                                                : grads[0].contiguous();

    Tensor ga, gb, gc, ge;
    if (at::GradMode::is_enabled()) {
      // create_graph=True: gradients that are themselves differentiable, from the reference.
      const auto g = reference_op().call(V.name, grad_out, a, b, c, rowptr, col, eid,
                                         optional(edge), scalar, dropout, optional(seed));
      TORCH_CHECK(g.size() == 4, "neptune::attention_grads_reference returned ", g.size(),
                  " gradients, expected 4");
      ga = g[0], gb = g[1], gc = g[2], ge = g[3];
    } else {
      const Tensor& src = V.src_input == 0 ? a : b;
      TORCH_SYM_CHECK(colptr.sym_numel().sym_eq(src.sym_size(0) + 1), "neptune::", V.name,
                  "_forward was called without the transposed graph, so it cannot be "
                  "differentiated; call it through ",
                  V.entry);
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(ga, gb, gc, ge) =
          backward_op<V>().call(grad_out, a, b, c, rowptr, col, eid, colptr, csc_row, csc_perm,
                                optional(edge), out, lse, scalar, dropout, optional(seed));
    }
    auto wanted = [&](int i, const Tensor& g) { return ctx->needs_input_grad(i) ? g : Tensor(); };
    return {wanted(0, ga), wanted(1, gb), wanted(2, gc), Tensor(), Tensor(), Tensor(), Tensor(),
            Tensor(), Tensor(), edge.defined() ? wanted(9, ge) : Tensor(), Tensor(), Tensor(),
            Tensor()};
  }

  static std::tuple<Tensor, Tensor> apply_op(const Tensor& a, const Tensor& b, const Tensor& c,
                                             const Tensor& rowptr, const Tensor& col,
                                             const Tensor& eid, const Tensor& colptr,
                                             const Tensor& csc_row, const Tensor& csc_perm,
                                             const OptTensor& edge, double scalar, double dropout,
                                             const OptTensor& seed) {
    auto r = AttentionFunction<V>::apply(a, b, c, rowptr, col, eid, colptr, csc_row, csc_perm,
                                         edge, scalar, dropout, seed);
    return {r[0], r[1]};
  }
};

}  // namespace
}  // namespace neptune

TORCH_LIBRARY_IMPL(neptune, Autograd, m) {
  m.impl("gat_forward", &neptune::AttentionFunction<neptune::kGat>::apply_op);
  m.impl("gat_att_forward", &neptune::AttentionFunction<neptune::kGatAtt>::apply_op);
  m.impl("gatv2_forward", &neptune::AttentionFunction<neptune::kGatv2>::apply_op);
  m.impl("transformer_forward", &neptune::AttentionFunction<neptune::kTransformer>::apply_op);
  m.impl("transformer_edge_forward",
         &neptune::AttentionFunction<neptune::kTransformerEdge>::apply_op);
}
