"""The fused BN+ReLU op (torch.ops.neptune.bn_relu_*) against eager PyTorch and its reference."""

import pytest
import torch

from neptune_ext import ops
from neptune_ext.stage.reference import bn_relu_backward_reference, bn_relu_forward_reference

from conftest import DEVICES, same_bits_across_thread_counts
from stage_helpers import F64, LAYOUTS, eager_bn_relu, layout, needs_ext


# ----------------------------------------------------------------------------
# The BN+ReLU op

# Shapes cover a single piece, several pieces per NCHW plane (H*W > 8192) and
# several row pieces in channels_last (N*H*W*C > 8192), C = 1 and odd sizes.
OP_SHAPES = [(4, 5, 7, 9), (2, 3, 100, 91), (2, 5, 40, 50), (3, 1, 5, 5), (5, 16, 1, 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", OP_SHAPES)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_bn_relu_matches_eager_float64(shape, kind, device):
    x = layout(torch.randn(*shape, dtype=torch.float64, device=device), kind).requires_grad_()
    w = torch.randn(shape[1], dtype=torch.float64, device=device).requires_grad_()
    b = torch.randn(shape[1], dtype=torch.float64, device=device).requires_grad_()
    y, mean, var = ops.bn_relu(x, w, b, 1e-5)
    exp = eager_bn_relu(x, w, b)
    torch.testing.assert_close(y, exp, **F64)
    if kind != "strided":
        assert y.stride() == exp.stride()
    torch.testing.assert_close(mean, x.mean(dim=(0, 2, 3)), **F64)
    torch.testing.assert_close(var, x.var(dim=(0, 2, 3), unbiased=False), **F64)
    g = torch.randn_like(exp)
    got = torch.autograd.grad(y, (x, w, b), g)
    want = torch.autograd.grad(exp, (x, w, b), g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **F64)
    # Where the output is 0 the input gradient is not (unless the whole channel is 0):
    # BN couples all positions of a channel.
    live_channel = (exp.detach() > 0).any(dim=3, keepdim=True).any(dim=2, keepdim=True).any(dim=0, keepdim=True)
    dead = (exp.detach() == 0) & live_channel
    if dead.any():
        assert got[0][dead].abs().max() > 1e-8


@pytest.mark.parametrize("device", DEVICES)
def test_bn_relu_reference_is_the_oracle(device):
    """The pure-PyTorch reference (the fallback) against eager, forward and closed-form backward."""
    x = torch.randn(3, 4, 6, 5, dtype=torch.float64, device=device).requires_grad_()
    w, b = torch.randn(4, dtype=torch.float64, device=device), torch.zeros(4, dtype=torch.float64, device=device)
    y, mean, var, invstd = bn_relu_forward_reference(x, w, b, 1e-3)
    exp = eager_bn_relu(x, w, b, 1e-3)
    torch.testing.assert_close(y, exp, **F64)
    g = torch.randn_like(y)
    w_, b_ = w.clone().requires_grad_(), b.clone().requires_grad_()
    want = torch.autograd.grad(eager_bn_relu(x, w_, b_, 1e-3), (x, w_, b_), g)
    got = bn_relu_backward_reference(g, x.detach(), w, b, mean, invstd)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **F64)
    # About half the outputs are 0 (bias 0); their input gradient is not 0, so a
    # backward that knew only y (x_hat unknown where y = 0) could not be exact.
    # Where y = 0 the gradient is -(w invstd / n) (A + x_hat B) with A = sum(g) and
    # B = sum(g x_hat) over the live outputs of the channel: zero only if x_hat hit
    # -A/B exactly. Judged against that scale, so a small w cannot fail the test.
    dead = y == 0
    assert 0.25 < dead.double().mean() < 0.75
    n = x.numel() // x.shape[1]
    x_hat = ((x.detach() - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1))
    live = (~dead).double()
    A = (g * live).sum(dim=(0, 2, 3))
    B = (g * x_hat * live).sum(dim=(0, 2, 3))
    scale = (w.abs() * invstd / n * (A.abs() + B.abs())).view(1, -1, 1, 1).expand_as(y)
    assert (got[0][dead].abs() > 1e-9 * scale[dead]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_bn_relu_opcheck(kind, device):
    needs_ext(device)
    x = layout(torch.randn(3, 4, 5, 6, dtype=torch.float64, device=device), kind).requires_grad_()
    w = torch.randn(4, dtype=torch.float64, device=device).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, device=device).requires_grad_()
    torch.library.opcheck(torch.ops.neptune.bn_relu_forward.default, (x, w, b, 1e-5))
    y, mean, var, invstd = torch.ops.neptune.bn_relu_forward(x, w, b, 1e-5)
    bargs = (torch.randn_like(y), x.detach(), w.detach(), b.detach(), mean, invstd)
    torch.library.opcheck(torch.ops.neptune.bn_relu_backward.default, bargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_bn_relu_gradcheck(kind, device):
    x = layout(torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device), kind).requires_grad_()
    w = (torch.rand(3, dtype=torch.float64, device=device) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, device=device).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: ops.bn_relu(x, w, b, 1e-5)[0], (x, w, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_bn_relu_bitwise_deterministic_across_threads(kind, device):
    needs_ext(device)
    x = layout(torch.randn(4, 24, 60, 50, device=device), kind)
    w, b = torch.randn(24, device=device), torch.randn(24, device=device)
    g = torch.randn_like(x)

    def run():
        y, mean, var, invstd = torch.ops.neptune.bn_relu_forward(x, w, b, 1e-5)
        return (y, mean, var) + torch.ops.neptune.bn_relu_backward(g, x, w, b, mean, invstd)

    same_bits_across_thread_counts(run)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bn_relu_low_precision_no_worse_than_pytorch(dtype, device):
    """Error vs float64 at most twice plain PyTorch's own error in `dtype`."""
    x64 = torch.randn(4, 8, 9, 10, dtype=torch.float64, device=device) * 3 + 1
    w64, b64 = torch.randn(8, dtype=torch.float64, device=device), torch.randn(8, dtype=torch.float64, device=device)
    low = [t.to(dtype).requires_grad_() for t in (x64, w64, b64)]
    exact_in = [t.detach().double().requires_grad_() for t in low]
    y = ops.bn_relu(*low)[0]
    y_torch = eager_bn_relu(*low)
    y_exact = eager_bn_relu(*exact_in)
    eps = torch.finfo(dtype).eps
    err = (y.double() - y_exact).abs().max().item()
    err_torch = (y_torch.double() - y_exact).abs().max().item()
    # rounding is relative: outputs reach several units, where one float32 ulp is 4-8 eps
    assert err <= 2 * err_torch + 4 * eps * y_exact.abs().max().item(), (err, err_torch)
    g = torch.randn_like(y_exact)
    for a, t, e in zip(torch.autograd.grad(y, low, g.to(dtype)),
                       torch.autograd.grad(y_torch, low, g.to(dtype)),
                       torch.autograd.grad(y_exact, exact_in, g)):
        e_k = (a.double() - e).abs().max().item()
        e_t = (t.double() - e).abs().max().item()
        assert e_k <= 2 * e_t + 8 * eps * e.abs().max().item(), (e_k, e_t)


def test_bn_relu_reference_fallback_matches(monkeypatch):
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    y = ops.bn_relu(x, w, b)[0]
    grads = torch.autograd.grad(y, (x, w, b), g)
    monkeypatch.setenv("NEPTUNE_FORCE_REFERENCE", "1")
    y_ref = ops.bn_relu(x, w, b)[0]
    torch.testing.assert_close(y, y_ref, **F64)
    for a, e in zip(grads, torch.autograd.grad(y_ref, (x, w, b), g)):
        torch.testing.assert_close(a, e, **F64)


class TestBnReluBadInput:
    def setup_method(self):
        self.x, self.w, self.b = torch.randn(2, 3, 4, 4), torch.ones(3), torch.zeros(3)

    @pytest.mark.parametrize("kw,match", [
        (lambda s: dict(x=s.x[0]), r"x must have shape \[N, C, H, W\]"),
        (lambda s: dict(x=s.x.long()), "x must be a floating-point tensor"),
        (lambda s: dict(x=[1.0]), "x must be a torch.Tensor"),
        (lambda s: dict(weight=s.w[:2]), r"weight must have shape \[C\] = \[3\]"),
        (lambda s: dict(bias=s.b[:, None]), r"bias must have shape \[C\] = \[3\]"),
        (lambda s: dict(weight=s.w.long()), "weight must be a floating-point tensor"),
        (lambda s: dict(eps=0.0), "eps must be a positive float"),
        (lambda s: dict(x=s.x[:1, :, :1, :1]), "more than 1 value per channel"),
    ])
    def test_raises(self, kw, match):
        args = dict(x=self.x, weight=self.w, bias=self.b, eps=1e-5)
        args.update(kw(self))
        with pytest.raises(ValueError, match=match):
            ops.bn_relu(**args)

    def test_raw_op_rejects_bad_shapes(self):
        needs_ext()
        with pytest.raises(RuntimeError, match="weight must be"):
            torch.ops.neptune.bn_relu_forward(self.x, self.w[:2], self.b, 1e-5)
        with pytest.raises(RuntimeError, match="grad_y must match x"):
            torch.ops.neptune.bn_relu_backward(self.x[:1], self.x, self.w, self.b, self.w, self.w)
