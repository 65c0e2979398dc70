"""Stage (Conv2d -> BatchNorm2d -> ReLU): the fused op and layer against eager PyTorch."""
import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neptune_ext
from neptune_ext import ops
from neptune_ext.nn import Stage
from neptune_ext.ops import stage as stage_ops
from neptune_ext.reference_stage import bn_relu_backward_reference, bn_relu_forward_reference

from conftest import DEVICES

F64 = dict(rtol=1e-10, atol=1e-10)
LAYOUTS = ["nchw", "channels_last", "strided"]


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "strided":  # neither NCHW- nor channels_last-contiguous
        return torch.cat([t, t], dim=3)[..., ::2]
    return t.contiguous()


def eager_bn_relu(x, w, b, eps=1e-5):
    return F.relu(F.batch_norm(x, None, None, w, b, True, 0.0, eps))


def needs_ext(device="cpu"):
    if neptune_ext._ext._C is None:
        pytest.skip("extension not built")
    if not stage_ops._has_stage_kernel(torch.device(device).type):
        pytest.skip(f"no compiled Stage kernel for {device} (the reference runs there)")


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
    threads = torch.get_num_threads()
    results = []
    for n in (threads, 1, threads):
        torch.set_num_threads(n)
        try:
            y, mean, var, invstd = torch.ops.neptune.bn_relu_forward(x, w, b, 1e-5)
            results.append((y, mean, var) + torch.ops.neptune.bn_relu_backward(g, x, w, b, mean, invstd))
        finally:
            torch.set_num_threads(threads)
    for other in results[1:]:
        for a, e in zip(results[0], other):
            assert torch.equal(a, e)


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
    assert err <= 2 * err_torch + 4 * eps, (err, err_torch)
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


# ----------------------------------------------------------------------------
# The Stage layer against nn.Sequential(conv, bn, relu)

# (C_in, C_out, kernel, stride, padding, dilation, groups, N, H, W)
CASES = {
    "k1": (4, 6, 1, 1, 0, 1, 1, 3, 7, 9),
    "k3_pad1": (3, 5, 3, 1, 1, 1, 1, 2, 9, 8),
    "k3_stride2_odd": (4, 8, 3, 2, 1, 1, 1, 2, 11, 13),
    "k5_pad2": (2, 4, 5, 1, 2, 1, 1, 2, 9, 7),
    "k5_stride2_nopad": (3, 4, 5, 2, 0, 1, 1, 2, 13, 11),
    "dilation2": (4, 4, 3, 1, 2, 2, 1, 2, 10, 9),
    "groups2": (4, 6, 3, 1, 1, 1, 2, 2, 7, 7),
    "depthwise": (6, 6, 3, 2, 1, 1, 6, 3, 9, 9),
    "rect": (3, 4, (3, 1), (2, 1), (1, 0), 1, 1, 2, 8, 5),
}


def assert_close_eval(y, expected):
    """float64: ~1e-10; float32: 1e-5 relative to the output's magnitude (BN is folded)."""
    if y.dtype == torch.float64:
        torch.testing.assert_close(y, expected, **F64)
    else:
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def make_pair(case, dtype=torch.float64, device="cpu", momentum=0.1, **bn_kw):
    cin, cout, k, s, p, d, g, *_ = CASES[case]
    stage = Stage(cin, cout, k, s, p, d, g, eps=1e-4, momentum=momentum, dtype=dtype, device=device)
    with torch.no_grad():
        stage.bn.weight.uniform_(0.5, 1.5)
        stage.bn.bias.normal_()
        stage.bn.running_mean.normal_()
        stage.bn.running_var.uniform_(0.5, 2.0)
    eager = nn.Sequential(copy.deepcopy(stage.conv), copy.deepcopy(stage.bn), nn.ReLU())
    return stage, eager


def make_input(case, kind="nchw", dtype=torch.float64, device="cpu", batch=None):
    cin, *_, n, h, w = CASES[case]
    return layout(torch.randn(batch or n, cin, h, w, dtype=dtype, device=device), kind)


def param_grads(stage, eager):
    return ([stage.conv.weight.grad, stage.bn.weight.grad, stage.bn.bias.grad],
            [eager[0].weight.grad, eager[1].weight.grad, eager[1].bias.grad])


def assert_bn_state_equal(stage_bn, eager_bn, **tol):
    torch.testing.assert_close(stage_bn.running_mean, eager_bn.running_mean, **tol)
    torch.testing.assert_close(stage_bn.running_var, eager_bn.running_var, **tol)
    assert stage_bn.num_batches_tracked.item() == eager_bn.num_batches_tracked.item()


@pytest.mark.parametrize("memory_efficient", [True, False])
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", list(CASES))
def test_train_matches_eager(case, kind, memory_efficient):
    stage, eager = make_pair(case)
    stage.memory_efficient = memory_efficient
    stage.train(), eager.train()
    opt_s = torch.optim.SGD(stage.parameters(), lr=0.1, momentum=0.9)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        x = make_input(case, kind)
        xs, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        ys, ye = stage(xs), eager(xe)
        torch.testing.assert_close(ys, ye, **F64)
        assert ys.stride() == ye.stride()
        g = torch.randn_like(ye)
        opt_s.zero_grad(), opt_e.zero_grad()
        (ys * g).sum().backward()
        (ye * g).sum().backward()
        torch.testing.assert_close(xs.grad, xe.grad, **F64)
        for a, e in zip(*param_grads(stage, eager)):
            torch.testing.assert_close(a, e, **F64)
        opt_s.step(), opt_e.step()
        assert_bn_state_equal(stage.bn, eager[1], **F64)
    assert stage.bn.num_batches_tracked.item() == 3
    # Evaluating after training uses the updated running statistics and parameters.
    stage.eval(), eager.eval()
    x = make_input(case, kind)
    torch.testing.assert_close(stage(x), eager(x), **F64)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", list(CASES))
def test_eval_matches_eager(case, kind, grad):
    stage, eager = make_pair(case)
    stage.eval(), eager.eval()
    for batch in (None, 1):
        x = make_input(case, kind, batch=batch)
        if grad:
            xs, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
            ys, ye = stage(xs), eager(xe)
            g = torch.randn_like(ye)
            (ys * g).sum().backward(), (ye * g).sum().backward()
            torch.testing.assert_close(xs.grad, xe.grad, **F64)
            for a, e in zip(*param_grads(stage, eager)):
                torch.testing.assert_close(a, e, **F64)
            stage.zero_grad(), eager.zero_grad()
        else:
            with torch.no_grad():
                ys, ye = stage(x), eager(x)
        torch.testing.assert_close(ys, ye, **F64)
        assert ys.stride() == ye.stride()
    assert stage.bn.num_batches_tracked.item() == 0


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", ["k3_stride2_odd", "depthwise", "dilation2"])
def test_eval_float32_matches_eager(case, kind):
    stage, eager = make_pair(case, dtype=torch.float32)
    stage.eval(), eager.eval()
    x = make_input(case, kind, dtype=torch.float32)
    for mode in (torch.no_grad, torch.inference_mode, torch.enable_grad):
        with mode():
            ys, ye = stage(x), eager(x)
        torch.testing.assert_close(ys, ye, rtol=1e-5, atol=1e-5 * ye.abs().max().item())
        assert ys.stride() == ye.stride()


def test_eval_channels_last_float32_uses_onednn_fused_path():
    if not stage_ops.onednn_fused_available():
        pytest.skip("this torch does not expose oneDNN's fused convolution")
    stage, eager = make_pair("k3_pad1", dtype=torch.float32)
    stage.eval(), eager.eval()
    x = make_input("k3_pad1", "channels_last", dtype=torch.float32)
    with torch.no_grad():
        y = stage(x)
        packed = stage._fold.pack.value
        assert packed is not None and packed.is_mkldnn
        torch.testing.assert_close(y, eager(x), rtol=1e-5, atol=1e-5)
        stage(x)
        assert stage._fold.pack.value is packed  # reused, not repacked
        stage(x[:1])
        assert stage._fold.pack.value is not packed  # another input shape: repacked


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_eval_fold_refreshes_after_optimizer_step_and_load_state_dict(kind):
    dtype = torch.float32 if kind == "channels_last" else torch.float64
    stage, eager = make_pair("k3_pad1", dtype=dtype)
    stage.eval(), eager.eval()
    x = make_input("k3_pad1", kind, dtype=dtype)
    with torch.no_grad():
        assert_close_eval(stage(x), eager(x))
        folded = stage._fold.fold.value
        stage(x)
        assert stage._fold.fold.value is folded  # cached: not recomputed
    # An optimizer step changes the parameters in place (versions bump).
    for module in (stage, eager):
        opt = torch.optim.SGD(module.parameters(), lr=0.5)
        module(x.clone().requires_grad_()).square().sum().backward()
        opt.step()
    with torch.no_grad():
        assert_close_eval(stage(x), eager(x))
        assert stage._fold.fold.value is not folded
    # load_state_dict copies into the existing tensors (same data_ptr, new version).
    other_stage, other_eager = make_pair("k3_pad1", dtype=dtype)
    stage.load_state_dict(other_stage.state_dict())
    eager.load_state_dict(other_eager.state_dict())
    with torch.no_grad():
        assert_close_eval(stage(x), eager(x))
        # Buffers alone (running statistics) also invalidate the fold.
        stage.bn.running_var.mul_(3.0)
        eager[1].running_var.mul_(3.0)
        assert_close_eval(stage(x), eager(x))
        # So does replacing a parameter object.
        new_w = torch.randn_like(stage.conv.weight)
        stage.conv.weight = nn.Parameter(new_w.clone())
        eager[0].weight = nn.Parameter(new_w.clone())
        assert_close_eval(stage(x), eager(x))


@pytest.mark.parametrize("momentum", [None, 0.3])
def test_running_stats_momentum(momentum):
    stage, eager = make_pair("k3_pad1", momentum=momentum)
    stage.train(), eager.train()
    with torch.no_grad():
        for _ in range(4):
            x = make_input("k3_pad1") * 2 + 1
            torch.testing.assert_close(stage(x), eager(x), **F64)
    assert_bn_state_equal(stage.bn, eager[1], **F64)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("affine,track", [(False, True), (True, False), (False, False)])
def test_affine_and_track_running_stats_variants(affine, track, train):
    cin, cout = 3, 5
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False).double()
    bn = nn.BatchNorm2d(cout, affine=affine, track_running_stats=track).double()
    stage = Stage.from_modules(copy.deepcopy(conv), copy.deepcopy(bn))
    eager = nn.Sequential(conv, bn, nn.ReLU())
    stage.train(train), eager.train(train)
    for _ in range(2):
        x = torch.randn(2, cin, 6, 7, dtype=torch.float64, requires_grad=True)
        xe = x.detach().clone().requires_grad_()
        ys, ye = stage(x), eager(xe)
        torch.testing.assert_close(ys, ye, **F64)
        g = torch.randn_like(ye)
        (ys * g).sum().backward(), (ye * g).sum().backward()
        torch.testing.assert_close(x.grad, xe.grad, **F64)
        torch.testing.assert_close(stage.conv.weight.grad, eager[0].weight.grad, **F64)
    if track:
        assert_bn_state_equal(stage.bn, eager[1], **F64)
    else:
        assert stage.bn.running_mean is None


def test_frozen_bn_inside_training_stage():
    """stage.bn.eval() in a training model: running statistics, as in the Sequential."""
    stage, eager = make_pair("k3_pad1")
    stage.train(), eager.train()
    stage.bn.eval(), eager[1].eval()
    x = make_input("k3_pad1").requires_grad_()
    xe = x.detach().clone().requires_grad_()
    ys, ye = stage(x), eager(xe)
    torch.testing.assert_close(ys, ye, **F64)
    ys.sum().backward(), ye.sum().backward()
    torch.testing.assert_close(x.grad, xe.grad, **F64)
    assert stage.bn.num_batches_tracked.item() == 0


@pytest.mark.parametrize("train", [True, False])
def test_from_modules_folds_conv_bias(train):
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=True).double()
    bn = nn.BatchNorm2d(4).double()
    with torch.no_grad():
        conv.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    eager = nn.Sequential(conv, bn, nn.ReLU()).train(train)
    bn_before = copy.deepcopy(bn.state_dict())
    stage = Stage.from_modules(conv, bn).train(train)
    assert stage.conv.bias is None and stage.conv.weight is conv.weight
    assert stage.bn.weight is bn.weight  # parameters shared, buffers shifted copies
    for k, v in bn.state_dict().items():
        assert torch.equal(v, bn_before[k])  # the given modules are left valid
    for _ in range(3):
        x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
        torch.testing.assert_close(stage(x), eager(x), **F64)
    torch.testing.assert_close(stage.bn.running_mean + conv.bias.detach(), bn.running_mean, **F64)
    torch.testing.assert_close(stage.bn.running_var, bn.running_var, **F64)


def test_conv_bias_assigned_to_a_stage_counts_in_running_mean():
    stage, eager = make_pair("k3_pad1")
    stage.conv = eager[0] = nn.Conv2d(3, 5, 3, padding=1).double()
    stage.train(), eager.train()
    for _ in range(2):
        x = make_input("k3_pad1")
        torch.testing.assert_close(stage(x), eager(x), **F64)
    assert_bn_state_equal(stage.bn, eager[1], **F64)
    stage.eval(), eager.eval()
    x = make_input("k3_pad1")
    with torch.no_grad():
        torch.testing.assert_close(stage(x), eager(x), **F64)


def test_state_dict_keys_and_sequential_checkpoint_loads():
    stage, eager = make_pair("k3_pad1")
    assert set(stage.state_dict()) == {
        "conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
        "bn.num_batches_tracked"}
    fresh = Stage(3, 5, 3, padding=1, eps=1e-4, dtype=torch.float64)
    fresh.load_state_dict(eager.state_dict())  # keys 0.* and 1.*
    fresh.eval(), eager.eval()
    x = make_input("k3_pad1")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), eager(x), **F64)
    # A checkpoint of a conv *with* bias loads with the bias folded into the BN.
    biased = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1).double(), copy.deepcopy(eager[1]), nn.ReLU())
    biased.eval()
    fresh.load_state_dict(biased.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), biased(x), **F64)


def test_padding_same_and_valid():
    for padding in ("same", "valid"):
        stage = Stage(3, 4, 3, padding=padding, dilation=2, dtype=torch.float64).eval()
        conv = nn.Conv2d(3, 4, 3, padding=padding, dilation=2, bias=False).double()
        conv.weight = stage.conv.weight
        eager = nn.Sequential(conv, stage.bn, nn.ReLU()).eval()
        x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
        torch.testing.assert_close(stage(x), eager(x), **F64)
    with pytest.raises(ValueError, match="even effective kernel"):
        Stage(3, 4, 2, padding="same")


def test_copy_and_pickle_after_packing():
    stage, _ = make_pair("k3_pad1", dtype=torch.float32)
    stage.eval()
    x = make_input("k3_pad1", "channels_last", dtype=torch.float32)
    with torch.no_grad():
        y = stage(x)
        for clone in (copy.deepcopy(stage), pickle.loads(pickle.dumps(stage))):
            torch.testing.assert_close(clone(x), y)
        buf = io.BytesIO()
        torch.save(stage.state_dict(), buf)


from neptune_ext.bench.stage import saved_bytes  # noqa: E402  (shared with the benchmark)


def test_stage_stack_saves_at_most_0_6x_eager_activation_memory():
    torch.manual_seed(0)
    layers = [Stage(8, 8, 3, padding=1) for _ in range(4)]
    stack = nn.Sequential(*layers).train()
    eager = nn.Sequential(*[m for s in layers for m in (copy.deepcopy(s.conv), copy.deepcopy(s.bn),
                                                       nn.ReLU())]).train()
    x = torch.randn(4, 8, 24, 24, requires_grad=True)
    ours = saved_bytes(lambda: stack(x))
    theirs = saved_bytes(lambda: eager(x))
    for s in layers:
        s.memory_efficient = False
    no_recompute = saved_bytes(lambda: stack(x))
    assert ours <= 0.6 * theirs, (ours, theirs)
    # Storing the conv outputs (no recompute) is eager's memory but the last ReLU output:
    # 2L vs 2L + 1 activations. The measurement does see them.
    assert no_recompute > 0.8 * theirs, (no_recompute, theirs)


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_conv_bn_relu_train_gradcheck(kind, recompute):
    inp = layout(torch.randn(2, 4, 5, 6, dtype=torch.float64), kind).requires_grad_()
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    bn_w = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    bn_b = torch.randn(6, dtype=torch.float64, requires_grad=True)

    def f(inp, w, bn_w, bn_b):
        return ops.conv_bn_relu_train(inp, w, bn_w, bn_b, stride=(2, 1), padding=1, groups=2,
                                      recompute=recompute)[0]

    assert torch.autograd.gradcheck(f, (inp, w, bn_w, bn_b))


def test_reference_fallback_for_the_layer(monkeypatch):
    stage, eager = make_pair("k3_stride2_odd")
    monkeypatch.setenv("NEPTUNE_FORCE_REFERENCE", "1")
    x = make_input("k3_stride2_odd", "channels_last").requires_grad_()
    xe = x.detach().clone().requires_grad_()
    ys, ye = stage(x), eager(xe)
    torch.testing.assert_close(ys, ye, **F64)
    ys.sum().backward(), ye.sum().backward()
    torch.testing.assert_close(x.grad, xe.grad, **F64)
    assert_bn_state_equal(stage.bn, eager[1], **F64)


class TestStageBadInput:
    @pytest.mark.parametrize("make,match", [
        (lambda: torch.randn(3, 8, 8), r"input must have shape \[N, C, H, W\]"),
        (lambda: torch.randn(2, 4, 8, 8), "input has 4 channels but the Stage has in_channels = 3"),
        (lambda: torch.randn(2, 3, 8, 8, dtype=torch.float64), "input dtype torch.float64"),
        (lambda: "not a tensor", "input must be a torch.Tensor"),
        (lambda: torch.randn(2, 3, 1, 1), "input height 1 .* is smaller than the effective kernel"),
        (lambda: torch.randn(1, 3, 3, 3), "more than 1 value per channel when training"),
    ])
    def test_raises(self, make, match):
        stage = Stage(3, 5, 3).train()
        with pytest.raises(ValueError, match=match):
            stage(make())

    def test_from_modules_checks(self):
        with pytest.raises(ValueError, match="bn has num_features = 4 but conv has out_channels = 5"):
            Stage.from_modules(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(4))
        with pytest.raises(ValueError, match="conv must be an nn.Conv2d"):
            Stage.from_modules(nn.Linear(3, 5), nn.BatchNorm2d(5))
        with pytest.raises(ValueError, match="padding_mode must be 'zeros'"):
            Stage.from_modules(nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(5))
