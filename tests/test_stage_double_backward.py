"""Double backward (``torch.autograd.grad(..., create_graph=True)`` then a second grad:
gradient penalties, meta-learning) through a Stage, a fused model and the BN+ReLU op:
eager's second derivatives in float64, in train and eval, on every path (fused BN+ReLU
kernel, recomputing conv_bn_act_train, memory_efficient=False, eager fallback, eval fold)."""
import copy

import pytest
import torch
from torch import nn

import neptune_ext
from neptune_ext.nn import Stage
from neptune_ext.stage import functional as ops

ACTS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, None: nn.Identity}


def make(activation, bias=False, memory_efficient=True):
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=bias).double()
    bn = nn.BatchNorm2d(4).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(0, 0.5)
        bn.running_mean.normal_(0, 0.3), bn.running_var.uniform_(0.5, 2.0)
    eager = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn), ACTS[activation]())
    stage = Stage.from_modules(conv, bn, activation=activation, memory_efficient=memory_efficient)
    return stage, eager


def second_order(forward, x, r, params):
    """A gradient penalty: d/d(x, r, params) of |d loss / d(x, params)|^2 (loss nonlinear in
    the output, so the second derivatives through BN are not zero)."""
    y = forward(x, r)
    loss = (y * torch.linspace(-1, 2, y.numel(), dtype=y.dtype).view_as(y)).square().sum()
    wrt = [x] + params
    first = torch.autograd.grad(loss, wrt, create_graph=True)
    penalty = sum(g.square().sum() for g in first)
    inputs = wrt + ([r] if r is not None else [])
    second = torch.autograd.grad(penalty, inputs, allow_unused=True)
    return [g.detach() for g in first], [None if g is None else g.detach() for g in second]


def assert_all_close(got, want):
    """Equal to float64 rounding, judged against each list's largest value (a conv bias
    before a training BN has a zero gradient that eager computes as ~1e-10 of rounding)."""
    assert len(got) == len(want)
    scale = max(b.abs().max().item() for b in want if b is not None)
    for i, (a, b) in enumerate(zip(got, want)):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0, i
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12 * scale,
                                       msg=lambda m: f"tensor {i}: {m}")


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("activation,residual,bias,memory_efficient", [
    ("relu", False, False, True),    # fused BN+ReLU kernel, recomputing backward
    ("relu", False, True, False),    # the same keeping the conv output; a conv bias
    ("relu6", False, False, True),   # conv_bn_act_train
    (None, False, True, True),
    ("relu", True, False, True),     # residual tail
    ("relu", True, False, False),    # eager (memory_efficient=False with a residual)
    ("silu", False, False, True),    # eager (no fused training path)
])
def test_stage_second_derivatives_equal_eager(train, activation, residual, bias, memory_efficient):
    stage, eager = make(activation, bias, memory_efficient)
    stage.train(train), eager.train(train)
    x = torch.randn(3, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 4, 5, 4, dtype=torch.float64, requires_grad=True) if residual else None
    xe = x.detach().clone().requires_grad_()
    re = r.detach().clone().requires_grad_() if residual else None

    def run_stage(x, r):
        return stage(x, r)

    def run_eager(x, r):
        return eager(x) if r is None else eager[2](eager[1](eager[0](x)) + r)

    s_params = [stage.conv.weight, stage.bn.weight, stage.bn.bias]
    e_params = [eager[0].weight, eager[1].weight, eager[1].bias]
    first, second = second_order(run_stage, x, r, s_params)
    first_e, second_e = second_order(run_eager, xe, re, e_params)
    assert_all_close(first, first_e)
    assert_all_close(second, second_e)
    assert any(g is not None and g.abs().max() > 1e-3 for g in second)  # a real test
    # running statistics: one update per forward, as eager
    torch.testing.assert_close(stage.bn.running_var, eager[1].running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("train", [True, False])
def test_fused_model_second_derivatives_equal_the_original(train):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            out += x
            return self.relu(out)

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), Block())
    model = model.double().train(train)
    fused = neptune_ext.fuse_stages(model)
    assert sorted(fused.fusion_report) == ["0+1+2 -> Stage", "3.conv1+bn1+relu -> Stage",
                                           "3.conv2+bn2+add+relu -> Stage+residual"]
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    xe = x.detach().clone().requires_grad_()
    first, second = second_order(lambda x, r: fused(x), x, None, list(fused.parameters()))
    first_e, second_e = second_order(lambda x, r: model(x), xe, None, list(model.parameters()))
    assert_all_close(first, first_e)
    assert_all_close(second, second_e)


def test_bn_relu_op_second_derivatives_equal_eager():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def ours(x, w, b):
        return ops.bn_relu(x, w, b)[0]

    def eager(x, w, b):
        return torch.relu(torch.nn.functional.batch_norm(x, None, None, w, b, True, 0.0, 1e-5))

    results = []
    for f in (ours, eager):
        xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
        y = f(xs, ws, bs)
        g = torch.autograd.grad((y * y.detach().flip(0)).sum() + y.square().sum(), (xs, ws, bs),
                                create_graph=True)
        h = torch.autograd.grad(sum(t.square().sum() for t in g), (xs, ws, bs))
        results.append([t.detach() for t in g + h])
    assert_all_close(results[0], results[1])
