"""The Stage's evaluation and training paths on every device (the CPU here; CUDA where a GPU
is present: cuDNN's fused calls, the autocast paths), against float64 references: each
covered conv shape (1x1, 3x3, stride 2, depthwise, the 7x7 stem), float32/float16/bfloat16,
NCHW, channels_last and non-contiguous inputs, batch 1 and odd sizes, every activation,
with and without a residual. The bar: no further from float64 than eager in the same dtype
is (plus a few units of that dtype's rounding), and deterministic."""
import copy

import pytest
import torch
from torch import nn

from neptune_ext.nn import Stage
from neptune_ext.stage.eval import eval_path_counts, reset_eval_path_counts

from stage_helpers import layout as arrange

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
ACT_MODULES = {"relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "hardswish": nn.Hardswish,
               None: nn.Identity}
EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
# name: (c_in, c_out, kernel, stride, groups, H, W)
SHAPES = {
    "1x1": (16, 24, 1, 1, 1, 9, 7),
    "1x1_s2": (16, 32, 1, 2, 1, 9, 7),
    "3x3": (16, 16, 3, 1, 1, 9, 7),
    "3x3_s2": (16, 32, 3, 2, 1, 10, 9),
    "depthwise3x3": (16, 16, 3, 1, 16, 9, 7),
    "stem7x7_s2": (3, 16, 7, 2, 1, 15, 13),
}
LAYOUTS = ["nchw", "channels_last", "strided"]  # (stage_helpers.layout)


def build(shape, activation, device, dtype):
    c_in, c_out, k, s, g, _, _ = SHAPES[shape]
    stage = Stage(c_in, c_out, k, stride=s, padding=k // 2, groups=g, activation=activation)
    with torch.no_grad():
        stage.bn.weight.uniform_(0.5, 1.5)
        stage.bn.bias.normal_(0, 0.5)
        stage.bn.running_mean.normal_(0, 0.3)
        stage.bn.running_var.uniform_(0.5, 2.0)
    ref = nn.Sequential(copy.deepcopy(stage.conv), copy.deepcopy(stage.bn),
                        ACT_MODULES[activation]()).double()
    eager = nn.Sequential(copy.deepcopy(stage.conv), copy.deepcopy(stage.bn),
                          ACT_MODULES[activation]()).to(device, dtype)
    return stage.to(device, dtype), eager, ref


def tail(seq, x, r):
    y = seq[1](seq[0](x))
    return seq[2](y if r is None else y + r)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def skip_unsupported(device, dtype):
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("float16 convolutions: a GPU dtype")


def case(shape, batch, device, dtype, layout, residual):
    c_in, c_out, k, s, g, H, W = SHAPES[shape]
    x = torch.randn(batch, c_in, H, W, dtype=torch.float64)
    Ho, Wo = (H + 2 * (k // 2) - k) // s + 1, (W + 2 * (k // 2) - k) // s + 1
    r = torch.randn(batch, c_out, Ho, Wo, dtype=torch.float64) if residual else None
    xd = arrange(x.to(device, dtype), layout)
    rd = None if r is None else arrange(r.to(device, dtype), layout)
    return x, r, xd, rd


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_eval_every_shape_dtype_layout(shape, layout, dtype, device):
    skip_unsupported(device, dtype)
    # every activation and both residual cases across the grid, without multiplying it
    i = list(SHAPES).index(shape) + LAYOUTS.index(layout)
    activation = list(ACT_MODULES)[i % 5]
    residual = i % 2 == 0
    batch = 1 if i % 3 == 0 else 3
    stage, eager, ref = build(shape, activation, device, dtype)
    stage.eval(), eager.eval(), ref.eval()
    x, r, xd, rd = case(shape, batch, device, dtype, layout, residual)
    with torch.no_grad():
        want = tail(ref, x, r)
        theirs = tail(eager, xd, rd)
        reset_eval_path_counts()
        ours = stage(xd, rd)
        again = stage(xd, rd)
    assert ours.dtype == dtype and ours.shape == want.shape
    assert rel(ours, want) <= 4 * rel(theirs, want) + 8 * EPS[dtype], (rel(ours, want), rel(theirs, want))
    assert torch.equal(ours, again)  # deterministic
    assert "autograd" not in eval_path_counts()
    if layout == "channels_last" and min(ours.shape[2:]) > 1:
        assert ours.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("activation", list(ACT_MODULES))
def test_eval_every_activation_with_and_without_residual(activation, residual, device):
    for dtype in (torch.float32, torch.bfloat16):
        stage, eager, ref = build("3x3", activation, device, dtype)
        stage.eval(), eager.eval(), ref.eval()
        x, r, xd, rd = case("3x3", 2, device, dtype, "channels_last", residual)
        with torch.no_grad():
            want, theirs, ours = tail(ref, x, r), tail(eager, xd, rd), stage(xd, rd)
        assert rel(ours, want) <= 4 * rel(theirs, want) + 8 * EPS[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("activation", ["relu", "relu6", None])
@pytest.mark.parametrize("shape", ["3x3", "3x3_s2", "depthwise3x3"])
def test_train_float32_against_float64(shape, activation, residual, device):
    """Batch statistics: outputs, every gradient and the running statistics within float32
    rounding of the float64 eager modules."""
    stage, _, ref = build(shape, activation, device, torch.float32)
    stage.train(), ref.train()
    x, r, xd, rd = case(shape, 3, device, torch.float32, "channels_last", residual)
    xd.requires_grad_()
    if rd is not None:
        rd.requires_grad_()
    x.requires_grad_()
    if r is not None:
        r.requires_grad_()
    ours = stage(xd, rd)
    y = ref[1](ref[0](x))
    pre = y if r is None else y + r
    want = ref[2](pre)
    g = torch.randn(want.shape, dtype=torch.float64)
    # No gradient where the activation's input lies within 1e-4 of a kink (0; 6 for ReLU6):
    # float32 puts a value that close on either side by chance, and the side decides whether
    # its whole gradient passes.
    with torch.no_grad():
        near = pre.abs() < 1e-4
        if activation == "relu6":
            near |= (pre - 6).abs() < 1e-4
        g[near] = 0
    ours.backward(g.to(device, torch.float32)), want.backward(g)
    tol = 1e-4
    assert rel(ours, want) < tol
    assert rel(xd.grad, x.grad) < tol
    if residual:
        assert rel(rd.grad, r.grad) < tol
    assert rel(stage.conv.weight.grad, ref[0].weight.grad) < tol
    assert rel(stage.bn.weight.grad, ref[1].weight.grad) < tol
    assert rel(stage.bn.bias.grad, ref[1].bias.grad) < tol
    assert rel(stage.bn.running_mean, ref[1].running_mean) < tol
    assert rel(stage.bn.running_var, ref[1].running_var) < tol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train", [True, False])
def test_autocast_bfloat16_against_float64(train, device):
    """Under bfloat16 autocast, train and eval (no autograd in eval): as close to float64 as
    eager under autocast, output dtype and running statistics as eager's."""
    for residual in (False, True):
        stage, _, ref = build("3x3", "relu", device, torch.float32)
        eager = copy.deepcopy(ref).float().to(device)
        for m in (stage, eager, ref):
            m.train(train)
        x, r, xd, rd = case("3x3", 4, device, torch.float32, "channels_last", residual)
        if rd is not None:
            rd = rd.bfloat16()
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            ours, theirs = stage(xd, rd), tail(eager, xd, rd)
        want = tail(ref, x, None if r is None else r.bfloat16().double())
        assert ours.dtype == theirs.dtype
        assert rel(ours, want) <= 2 * rel(theirs, want) + 8 * EPS[torch.bfloat16]
        if train:
            assert rel(stage.bn.running_var, eager[1].running_var) < 1e-3
