"""Stage with each activation (ReLU, ReLU6, SiLU, Hardswish, none) and with a residual
input, against the eager modules: float64 outputs, gradients and running statistics in
train and eval, the fused CPU paths in float32, autocast, and bad arguments."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neptune_ext.nn import Stage
from neptune_ext.stage.module import FusedConv2d
from neptune_ext.stage import functional as ops
from neptune_ext.stage.eval import eval_path_counts, reset_eval_path_counts

from stage_helpers import F64

ACTS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "hardswish": nn.Hardswish,
        None: nn.Identity}


def make(activation, c_in=6, c_out=8, dtype=torch.float64, **kw):
    stage = Stage(c_in, c_out, 3, padding=1, activation=activation, dtype=dtype, **kw)
    with torch.no_grad():
        stage.bn.weight.uniform_(0.5, 1.5)
        stage.bn.bias.normal_(0, 0.5)
        stage.bn.running_mean.normal_(0, 0.3)
        stage.bn.running_var.uniform_(0.5, 2.0)
    eager = nn.Sequential(copy.deepcopy(stage.conv), copy.deepcopy(stage.bn), ACTS[activation]())
    return stage, eager


def eager_tail(eager, x, residual):
    """activation(bn(conv(x)) + residual) with the eager modules."""
    return eager[2](eager[1](eager[0](x)) + residual)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("train", [True, False])
def test_stage_matches_eager_float64(activation, residual, train):
    stage, eager = make(activation)
    stage.train(train), eager.train(train)
    for _ in range(2):  # twice: running statistics, and the fold cache on the second call
        x = torch.randn(3, 6, 7, 5, dtype=torch.float64, requires_grad=True)
        r = torch.randn(3, 8, 7, 5, dtype=torch.float64, requires_grad=True) if residual else None
        xe = x.detach().clone().requires_grad_()
        re = r.detach().clone().requires_grad_() if residual else None
        got = stage(x, r) if residual else stage(x)
        want = eager_tail(eager, xe, re) if residual else eager(xe)
        torch.testing.assert_close(got, want, **F64)
        g = torch.randn_like(got)
        got.backward(g), want.backward(g)
        torch.testing.assert_close(x.grad, xe.grad, **F64)
        if residual:
            torch.testing.assert_close(r.grad, re.grad, **F64)
        for a, b in ((stage.conv.weight, eager[0].weight), (stage.bn.weight, eager[1].weight),
                     (stage.bn.bias, eager[1].bias)):
            torch.testing.assert_close(a.grad, b.grad, **F64)
        torch.testing.assert_close(stage.bn.running_mean, eager[1].running_mean, **F64)
        torch.testing.assert_close(stage.bn.running_var, eager[1].running_var, **F64)
        # Without autograd (the cached fold, in-place add and activation)
        with torch.no_grad():
            got = stage(x, r) if residual else stage(x)
            want = eager_tail(eager, x, r) if residual else eager(x)
        torch.testing.assert_close(got, want, **F64)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_stage_eval_float32_fused_paths(activation, residual, kind):
    """The float32 eval paths (oneDNN post-ops for channels_last, conv2d + in-place ops
    for NCHW) equal eager within float32 rounding and keep the layout."""
    stage, eager = make(activation, dtype=torch.float32)
    stage.eval(), eager.eval()
    fmt = torch.channels_last if kind == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 6, 9, 7).contiguous(memory_format=fmt)
    r = torch.randn(2, 8, 9, 7).contiguous(memory_format=fmt) if residual else None
    reset_eval_path_counts()
    with torch.no_grad():
        got = stage(x, r) if residual else stage(x)
        want = eager_tail(eager, x, r) if residual else eager(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.is_contiguous(memory_format=fmt)
    paths = eval_path_counts()
    assert sum(paths.values()) == 1 and "autograd" not in paths
    if kind == "channels_last" and ops.onednn_fused_available():
        # oneDNN fuses every activation alone, and only ReLU (or none) after an add.
        fused_all = not residual or activation in ("relu", None)
        assert paths == ({"onednn-fused": 1} if fused_all else {"onednn+activation": 1}), paths


def test_residual_that_broadcasts_or_promotes_is_added_as_eager_adds_it():
    stage, eager = make("relu")
    stage.eval(), eager.eval()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    for r in (torch.randn(1, 8, 1, 1, dtype=torch.float64), torch.randn(8, 5, 5, dtype=torch.float64),
              torch.tensor(0.5, dtype=torch.float64), torch.randn(2, 8, 5, 5, dtype=torch.float32)):
        with torch.no_grad():
            got, want = stage(x, r), eager_tail(eager, x, r)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, **F64)


def test_residual_channels_last_mismatch_and_nchw_input_still_correct():
    stage, eager = make("silu", dtype=torch.float32)
    stage.eval(), eager.eval()
    x = torch.randn(2, 6, 6, 6).contiguous(memory_format=torch.channels_last)
    r = torch.randn(2, 8, 6, 6)  # NCHW residual for a channels_last input
    with torch.no_grad():
        torch.testing.assert_close(stage(x, r), eager_tail(eager, x, r), rtol=1e-5, atol=1e-5)


def test_conv_bn_act_eval_gradcheck_with_residual():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 4, 5, 4, dtype=torch.float64, requires_grad=True)
    bw = torch.rand(4, dtype=torch.float64) + 0.5
    bb, rm, rv = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64), \
        torch.rand(4, dtype=torch.float64) + 0.5
    for act in ("silu", "hardswish", "none"):  # smooth enough for finite differences
        torch.autograd.gradcheck(
            lambda x, w, r: ops.conv_bn_act_eval(x, w, None, bw, bb, rm, rv, 1e-5, 1, 1,
                                                 activation=act, residual=r), (x, w, r))


def test_stage_under_cpu_autocast_with_residual_matches_eager():
    stage, eager = make("hardswish", dtype=torch.float32)
    for train in (True, False):
        stage.train(train), eager.train(train)
        x, r = torch.randn(2, 6, 7, 7), torch.randn(2, 8, 7, 7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = stage(x, r), eager_tail(eager, x, r)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_bad_activation_and_residual_arguments():
    with pytest.raises(ValueError, match="activation must be one of 'relu', 'relu6', 'silu'"):
        Stage(3, 4, 3, activation="gelu")
    with pytest.raises(ValueError, match="activation must be one of"):
        Stage(3, 4, 3, activation=nn.ReLU())
    stage = Stage(3, 4, 3, padding=1, activation="ReLU6")
    assert stage.activation == "relu6" and "relu6" in repr(stage)
    x = torch.randn(2, 3, 5, 5)
    for train in (True, False):
        stage.train(train)
        with pytest.raises(ValueError, match="residual must be a torch.Tensor or None, got list"):
            stage(x, [1.0])
        with pytest.raises(ValueError, match="residual is on meta but input is on cpu"):
            stage(x, torch.empty(2, 4, 5, 5, device="meta"))
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.conv_bn_act_eval(x, torch.randn(4, 3, 3, 3), None, None, None, torch.zeros(4),
                             torch.ones(4), 1e-5, activation="tanh")


def test_fused_conv_without_a_residual_role_refuses_a_second_input():
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    bn.__class__ = nn.BatchNorm2d
    fused = FusedConv2d.convert(conv, bn, activation="relu")
    with pytest.raises(ValueError, match="not fused with a residual add"):
        fused(torch.randn(1, 3, 5, 5), torch.randn(1, 4, 3, 3))


def test_from_modules_takes_the_activation():
    conv, bn = nn.Conv2d(3, 4, 3, bias=True).double(), nn.BatchNorm2d(4).double().eval()
    stage = Stage.from_modules(conv, bn, activation="silu")
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(stage(x), F.silu(bn(conv(x))), **F64)


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_stage_eval_under_cpu_autocast_runs_fused_in_bfloat16(kind):
    """No autograd, eval, autocast: the folded convolution in bfloat16 (fold in float64 from
    the float32 parameters), as close to the float32 result as eager under autocast is."""
    stage, eager = make("relu6", dtype=torch.float32)
    stage.eval(), eager.eval()
    fmt = torch.channels_last if kind == "channels_last" else torch.contiguous_format
    x = torch.randn(4, 6, 12, 12).contiguous(memory_format=fmt)
    r = torch.randn(4, 8, 12, 12).to(torch.bfloat16).contiguous(memory_format=fmt)
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
    with torch.no_grad():
        ref = eager_tail(eager, x, r.float())
        reset_eval_path_counts()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = stage(x, r), eager_tail(eager, x, r)
    assert got.dtype == want.dtype == torch.bfloat16
    assert "autograd" not in eval_path_counts()
    assert rel(got, ref) <= 2 * rel(want, ref) + 5e-3
    # A float32 residual promotes the sum to float32, as in eager.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = stage(x, r.float()), eager_tail(eager, x, r.float())
    assert got.dtype == want.dtype == torch.float32
    # float64 parameters are not autocast's business: eager runs, bit for bit.
    stage64, eager64 = make("relu")
    stage64.eval(), eager64.eval()
    x64 = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(stage64(x64), eager64(x64), rtol=0, atol=0)


@pytest.mark.parametrize("activation", ["relu", "relu6", "none"])
@pytest.mark.parametrize("residual", [False, True])
def test_conv_bn_act_train_gradcheck(activation, residual):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    bw = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    bb = torch.randn(4, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 4, 5, 4, dtype=torch.float64, requires_grad=True) if residual else None
    inputs = (x, w, bw, bb) + ((r,) if residual else ())

    def f(x, w, bw, bb, r=None):
        return ops.conv_bn_act_train(x, w, bw, bb, r, 1, 1, activation=activation)[0]
    # (ReLU's kink: random inputs land on it with probability 0)
    torch.autograd.gradcheck(f, inputs)


def test_conv_bn_act_train_checks_its_arguments():
    x, w = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="activation must be 'relu', 'relu6' or 'none' here"):
        ops.conv_bn_act_train(x, w, None, None, activation="silu")
    with pytest.raises(ValueError, match=r"residual must be a tensor of the output's shape \[2, 4, 3, 3\]"):
        ops.conv_bn_act_train(x, w, None, None, torch.randn(2, 4, 5, 5))


def test_residual_block_training_saves_less_than_eager():
    """memory_efficient=True: a BasicBlock's tail in training keeps the conv input and the identity (both kept
    anyway), not the conv output: the fused block saves less than eager's."""
    torchvision = pytest.importorskip("torchvision")
    import neptune_ext
    from neptune_app.bench.stage import saved_bytes
    torch.manual_seed(0)
    block = torchvision.models.resnet.BasicBlock(16, 16).train()
    fused = neptune_ext.fuse_stages(block, memory_efficient=True)
    assert "conv2+bn2+add+relu -> Stage+residual" in fused.fusion_report
    x = torch.randn(4, 16, 20, 20)
    ours = saved_bytes(lambda: fused(x), exclude=list(fused.parameters()))
    theirs = saved_bytes(lambda: block(x), exclude=list(block.parameters()))
    assert ours <= 0.6 * theirs, (ours, theirs)


@pytest.mark.parametrize("activation", ["relu", "relu6", None])
def test_residual_stage_training_under_cpu_autocast_is_close_to_eager(activation):
    stage, eager = make(activation, dtype=torch.float32)
    stage.train(), eager.train()
    x, r = torch.randn(3, 6, 9, 9), torch.randn(3, 8, 9, 9).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = stage(x, r), eager_tail(eager, x, r)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=2 ** -7)
    torch.testing.assert_close(stage.bn.running_var, eager[1].running_var, rtol=1e-5, atol=1e-6)
    g = torch.randn(got.shape)
    got.float().backward(g), want.float().backward(g)
    rel = ((stage.conv.weight.grad - eager[0].weight.grad).norm() / eager[0].weight.grad.norm()).item()
    assert rel < 2e-2


def test_bad_residual_under_autocast_is_a_clear_error():
    stage = Stage(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 5, 5)
    for train in (True, False):
        stage.train(train)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with pytest.raises(ValueError, match="residual must be a torch.Tensor or None, got list"):
                stage(x, [1.0])
            with pytest.raises(ValueError, match="residual is on meta but input is on cpu"):
                stage(x, torch.empty(2, 4, 5, 5, device="meta"))


@pytest.mark.parametrize("activation,memory_efficient", [("relu", True), ("relu6", False),
                                                         (None, True)])
def test_broadcasting_residual_under_bf16_autocast_is_eager(activation, memory_efficient):
    """A residual that broadcasts ([N, 1, H, W], [1, C, 1, 1]) and memory_efficient=False
    take eager's computation under autocast in training: eager's dtype and values."""
    stage, eager = make(activation, dtype=torch.float32, memory_efficient=memory_efficient)
    for train in (True, False):
        stage.train(train), eager.train(train)
        for shape in ((2, 1, 7, 7), (1, 8, 1, 1), (2, 8, 7, 7)):
            x = torch.randn(2, 6, 7, 7, requires_grad=True)
            r = torch.randn(*shape, requires_grad=True)
            xe, re = (t.detach().clone().requires_grad_() for t in (x, r))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got, want = stage(x, r), eager_tail(eager, xe, re)
            assert got.dtype == want.dtype and got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
            got.float().sum().backward(), want.float().sum().backward()
            torch.testing.assert_close(r.grad, re.grad, rtol=1e-2, atol=1e-2 * re.grad.abs().max().item())
        torch.testing.assert_close(stage.bn.running_mean, eager[1].running_mean, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_residual_of_the_wrong_shape_is_a_value_error_naming_it(train, autocast):
    stage = Stage(3, 4, 3, padding=1).train(train)
    x = torch.randn(2, 3, 5, 5)
    for shape in ((2, 3, 5, 5), (2, 4, 5, 6), (2, 4, 5, 5, 1), (3, 4, 5, 5)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with pytest.raises(ValueError, match=r"residual must have the output's shape "
                               r"\[N, C_out, H_out, W_out\] = \[2, 4, 5, 5\] \(or broadcast to it\), "
                               + re.escape(f"got {list(shape)}")):
                stage(x, torch.randn(*shape))


def test_activation_is_checked_on_assignment():
    stage, eager = make("relu")
    for bad in ("gelu", nn.ReLU(), 3):
        with pytest.raises(ValueError, match="activation must be one of 'relu', 'relu6', 'silu', "
                           "'hardswish', 'none' or None"):
            stage.activation = bad
        assert stage.activation == "relu" and "activation" not in stage._modules
    stage.activation = "SiLU"  # takes effect in both modes
    assert stage.activation == "silu"
    eager[2] = nn.SiLU()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    for train in (True, False):
        stage.train(train), eager.train(train)
        torch.testing.assert_close(stage(x), eager(x), **F64)
    stage.activation = None
    assert stage.activation == "none"
    conv = FusedConv2d.convert(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), activation="relu")
    with pytest.raises(ValueError, match="activation must be one of"):
        conv.activation = "gelu"
    with pytest.raises(ValueError, match="residual_activation must be one of"):
        conv.residual_activation = "tanh"
    assert conv.activation == "relu" and conv.residual_activation is None
