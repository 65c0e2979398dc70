// The node projection (linear.h): its CPU kernels and its autograd.
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "linear/linear.h"
#include "memory/cpu_alloc.h"

namespace neptune {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Below this many multiply-adds a oneDNN call costs more (primitive set-up, ~10 us) than
// it saves.
constexpr int64_t kMinMacs = int64_t(1) << 20;
// grad W = g^T x reduces over the rows: oneDNN is ahead of torch's mm there only for
// inputs at least this wide (measured on an AMD EPYC: 2x faster at 500 and 1,433 input
// features, 2x slower at 128 with 10^5 rows).
constexpr int64_t kMinWidthForWeightGrad = 256;

// oneDNN's matmul as torch exposes it, or nullptr (a build without oneDNN, oneDNN disabled
// by the user through torch.backends.mkldnn, or an unknown schema).
const c10::OperatorHandle* onednn_linear() {
  static const std::optional<c10::OperatorHandle> op = []() -> std::optional<c10::OperatorHandle> {
    auto h = c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
    if (!h.has_value() || h->schema().arguments().size() != 6) return std::nullopt;
    return h;
  }();
  if (!op.has_value() || !at::globalContext().userEnabledMkldnn()) return nullptr;
  return &*op;
}

// x [M, K] times w^T (w [N, K], either may be a transposed view) plus bias through oneDNN,
// or nullopt when it does not apply.
std::optional<Tensor> onednn_matmul(const Tensor& x, const Tensor& w, const OptTensor& bias) {
  if (x.scalar_type() != at::kFloat || w.scalar_type() != at::kFloat) return std::nullopt;
  if (x.size(0) * x.size(1) * w.size(0) < kMinMacs || x.size(0) == 0) return std::nullopt;
  const c10::OperatorHandle* op = onednn_linear();
  if (op == nullptr) return std::nullopt;
  torch::jit::Stack stack{x, w, bias.has_value() ? c10::IValue(*bias) : c10::IValue(),
                          c10::IValue(std::string("none")),
                          c10::IValue(c10::List<std::optional<at::Scalar>>()),
                          c10::IValue(std::string(""))};
  op->callBoxed(&stack);
  return stack.back().toTensor();
}

// x [M, K] times w^T (w [N, K], either may be a transposed view) plus bias through the GEMM
// torch's Linear calls (at::linear of a 2-D input is addmm(b, x, w^T), or mm without a bias):
// the same numbers to the bit, into a buffer from empty_cpu - a large product's output
// reuses a freed buffer's pages instead of faulting in a fresh mapping (memory/cpu_alloc.h).
Tensor torch_matmul(const Tensor& x, const Tensor& w, const OptTensor& bias) {
  Tensor y = empty_cpu({x.size(0), w.size(0)}, x.options());
  if (bias.has_value()) return at::addmm_out(y, *bias, x, w.t());
  return at::mm_out(y, x, w.t());
}

}  // namespace

bool linear_prefers_onednn() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  static const bool amd = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("amd") != 0;
  }();
  return amd;
#else
  return false;
#endif
}

namespace {

void check_linear(const Tensor& x, const Tensor& w, const char* what) {
  TORCH_CHECK(x.dim() == 2, what, ": input must be 2-D [rows, in_features], got ", x.dim(), "-D");
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1), what, ": weight must be [out_features, ",
              x.size(1), "], got ", w.sizes());
  TORCH_CHECK(x.scalar_type() == w.scalar_type() && x.device() == w.device(), what,
              ": input and weight must share dtype and device, got ", x.scalar_type(), " on ",
              x.device(), " and ", w.scalar_type(), " on ", w.device());
}

}  // namespace

Tensor linear_cpu(const Tensor& input, const Tensor& weight, const OptTensor& bias, bool onednn) {
  check_linear(input, weight, "neptune::linear");
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) &&
                    bias->scalar_type() == weight.scalar_type(),
                "neptune::linear: bias must be [", weight.size(0), "] of the weight's dtype, got ",
                bias->sizes(), " ", bias->scalar_type());
  const Tensor x = input.contiguous();
  if (onednn) {
    // (oneDNN reads every operand densely: a strided or expanded bias is made contiguous too)
    const OptTensor b = bias.has_value() ? OptTensor(bias->contiguous()) : std::nullopt;
    if (auto y = onednn_matmul(x, weight.contiguous(), b)) return *y;
  }
  return torch_matmul(x, weight, bias);
}

std::tuple<Tensor, Tensor, Tensor> linear_backward_cpu(const Tensor& grad_out, const OptTensor& input,
                                                       const OptTensor& weight,
                                                       std::array<bool, 3> output_mask, bool onednn) {
  // input is needed (and given) for the weight's gradient only, weight for the input's
  const char* what = "neptune::linear_backward";
  TORCH_CHECK(grad_out.dim() == 2, what, ": grad_out must be 2-D, got ", grad_out.dim(), "-D");
  TORCH_CHECK(!output_mask[0] || weight.has_value(), what, ": the input's gradient needs the weight");
  TORCH_CHECK(!output_mask[1] || input.has_value(), what, ": the weight's gradient needs the input");
  if (weight.has_value())
    TORCH_CHECK(weight->dim() == 2 && weight->size(0) == grad_out.size(1), what, ": weight must be [",
                grad_out.size(1), ", in_features], got ", weight->sizes());
  if (input.has_value())
    TORCH_CHECK(input->dim() == 2 && input->size(0) == grad_out.size(0), what, ": input must be [",
                grad_out.size(0), ", in_features], got ", input->sizes());
  if (input.has_value() && weight.has_value()) check_linear(*input, *weight, what);
  const Tensor g = grad_out.contiguous();
  Tensor gx, gw, gb;
  if (output_mask[0]) {  // g W: oneDNN's (g, (W^T)^T), or torch's mm into empty_cpu
    std::optional<Tensor> r;
    if (onednn) r = onednn_matmul(g, weight->t(), std::nullopt);
    gx = r.has_value() ? *r : torch_matmul(g, weight->t(), std::nullopt);
  }
  if (output_mask[1]) {  // g^T x
    std::optional<Tensor> r;
    if (onednn && input->size(1) >= kMinWidthForWeightGrad)
      r = onednn_matmul(g.t(), input->contiguous().t(), std::nullopt);
    gw = r.has_value() ? *r : at::mm(g.t(), *input);
  }
  if (output_mask[2]) gb = at::sum(g, {0});
  // an output not asked for is an empty tensor (the schema returns three)
  const auto or_empty = [&](const Tensor& t) { return t.defined() ? t : g.new_empty({0}); };
  return {or_empty(gx), or_empty(gw), or_empty(gb)};
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSig = Tensor(const Tensor&, const Tensor&, const OptTensor&, bool);
const c10::TypedOperatorHandle<ForwardSig>& forward_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("neptune::linear", "")
                             .typed<ForwardSig>();
  return op;
}

using BackwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&,
                                                       const OptTensor&, std::array<bool, 3>, bool);
const c10::TypedOperatorHandle<BackwardSig>& backward_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("neptune::linear_backward", "")
                             .typed<BackwardSig>();
  return op;
}

struct LinearFunction : public torch::autograd::Function<LinearFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight,
                        const OptTensor& bias, bool onednn) {
    at::AutoDispatchBelowADInplaceOrView guard;
    // As torch's Linear: the input is kept only for the weight's gradient and the weight only
    // for the input's (a frozen layer keeps no input alive, and in-place writes to what no
    // gradient needs do not trip the version check).
    ctx->save_for_backward({weight.requires_grad() ? input : Tensor(),
                            input.requires_grad() ? weight : Tensor()});
    ctx->saved_data["bias"] = bias.has_value();
    ctx->saved_data["onednn"] = onednn;
    return forward_op().call(input, weight, bias, onednn);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const Tensor &x = s[0], &w = s[1];
    const bool has_bias = ctx->saved_data["bias"].toBool();
    const Tensor& g = grads[0];
    const std::array<bool, 3> mask{ctx->needs_input_grad(0) && w.defined(),
                                   ctx->needs_input_grad(1) && x.defined(),
                                   has_bias && ctx->needs_input_grad(2)};
    Tensor gx, gw, gb;
    if (at::GradMode::is_enabled()) {  // create_graph=True: differentiable gradients
      if (mask[0]) gx = g.mm(w);
      if (mask[1]) gw = g.t().mm(x);
      if (mask[2]) gb = g.sum(0);
    } else {
      at::AutoDispatchBelowADInplaceOrView guard;
      const auto opt = [](const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; };
      std::tie(gx, gw, gb) =
          backward_op().call(g, opt(x), opt(w), mask, ctx->saved_data["onednn"].toBool());
    }
    auto wanted = [&](int i, const Tensor& t) { return mask[i] ? t : Tensor(); };
    return {wanted(0, gx), wanted(1, gw), wanted(2, gb), Tensor()};
  }

  static Tensor apply_op(const Tensor& input, const Tensor& weight, const OptTensor& bias,
                         bool onednn) {
    return LinearFunction::apply(input, weight, bias, onednn);
  }
};

}  // namespace
}  // namespace neptune

TORCH_LIBRARY_IMPL(neptune, Autograd, m) {
  m.impl("linear", &neptune::LinearFunction::apply_op);
}
