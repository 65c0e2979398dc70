"""fuse_stages covers what real CNNs contain: every activation (ReLU, ReLU6, SiLU,
Hardswish, none) and the residual tails conv -> BN -> + identity (-> activation), on
hand-written patterns and on torchvision's models, with outputs, gradients and running
statistics equal to the original's in float64, in train and eval."""
import copy
import io
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neptune_ext
from neptune_ext.stage.fuse.block import FusedBlock
from neptune_ext.stage.module import (FusedBatchNorm2d, FusedConv2d, FusedHardswish, FusedReLU6,
                                  FusedSiLU)

torchvision = pytest.importorskip("torchvision")

from neptune_app.bench.stage import randomize_bn  # noqa: E402
from stage_helpers import fused_double  # noqa: E402

BasicBlock = torchvision.models.resnet.BasicBlock

F64 = dict(rtol=1e-9, atol=1e-10)


def close(got, want):
    """Equal up to float64 rounding grown through a deep network: elementwise to 1e-7 of
    the value plus 1e-8 of the tensor's largest magnitude (a wrong fusion is off by O(1))."""
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-8 * scale + 1e-12)


def conv_bn(c=4, bias=False):
    return nn.Conv2d(c, c, 3, padding=1, bias=bias), nn.BatchNorm2d(c)


class ActivationPatterns(nn.Module):
    """Each activation as a module used once, shared, and as a function."""

    def __init__(self):
        super().__init__()
        pairs = [conv_bn(bias=i % 3 == 0) for i in range(9)]
        self.convs = nn.ModuleList(p[0] for p in pairs)
        self.bns = nn.ModuleList(p[1] for p in pairs)
        self.relu6 = nn.ReLU6(inplace=True)     # used twice: stays, reapplied (idempotent)
        self.silu = nn.SiLU()                   # used once: fused, becomes a pass-through
        self.shared_silu = nn.SiLU()            # used twice: not idempotent, not fused
        self.hardswish = nn.Hardswish()

    def forward(self, x):
        x = self.relu6(self.bns[0](self.convs[0](x)))
        x = self.relu6(self.bns[1](self.convs[1](x)))
        x = self.silu(self.bns[2](self.convs[2](x)))
        x = self.shared_silu(self.bns[3](self.convs[3](x)))
        x = self.shared_silu(self.bns[4](self.convs[4](x)))
        x = self.hardswish(self.bns[5](self.convs[5](x)))
        x = F.relu6(self.bns[6](self.convs[6](x)))
        x = F.silu(self.bns[7](self.convs[7](x)))          # function: not fused (not idempotent)
        return F.hardswish(self.bns[8](self.convs[8](x)), inplace=True)  # the same


class ResidualPatterns(nn.Module):
    """Residual tails in the spellings blocks use, and adds that must not be fused."""

    def __init__(self):
        super().__init__()
        pairs = [conv_bn() for _ in range(7)]
        self.convs = nn.ModuleList(p[0] for p in pairs)
        self.bns = nn.ModuleList(p[1] for p in pairs)
        self.relu = nn.ReLU(inplace=True)
        self.act = nn.Hardswish()

    def forward(self, x):
        identity = x
        out = self.bns[0](self.convs[0](x))
        out += identity                                   # ResNet's spelling
        x = self.relu(out)
        x = F.relu(x + self.bns[1](self.convs[1](x)))     # identity first, functional ReLU
        x = self.act(torch.add(self.bns[2](self.convs[2](x)), x))
        x = x + self.bns[3](self.convs[3](x))             # no activation (MobileNetV2)
        y = x * 2
        y += self.bns[4](self.convs[4](x))                # into the identity, read by no one else
        z = self.bns[5](self.convs[5](y)).add(y, alpha=2)  # alpha: not a plain add, not fused
        w = self.bns[6](self.convs[6](z))
        w += 1.0                                          # a constant, not a residual
        return w + y


@pytest.mark.parametrize("train", [True, False])
def test_activation_patterns(train):
    model, fused = fused_double(ActivationPatterns, train)
    assert fused.fusion_report == [
        "convs.0+bns.0+relu6 -> Stage", "convs.1+bns.1+relu6 -> Stage",
        "convs.2+bns.2+silu -> Stage", "convs.3+bns.3 -> Conv+BN", "convs.4+bns.4 -> Conv+BN",
        "convs.5+bns.5+hardswish -> Stage", "convs.6+bns.6+relu6 -> Stage",
        "convs.7+bns.7 -> Conv+BN", "convs.8+bns.8 -> Conv+BN"]
    assert [c.activation for c in fused.convs] == [
        "relu6", "relu6", "silu", "none", "none", "hardswish", "relu6", "none", "none"]
    assert type(fused.silu) is FusedSiLU and type(fused.hardswish) is FusedHardswish
    assert type(fused.relu6) is nn.ReLU6 and type(fused.shared_silu) is nn.SiLU
    check_same(model, fused, (2, 4, 6, 5))


@pytest.mark.parametrize("train", [True, False])
def test_residual_patterns(train):
    model, fused = fused_double(ResidualPatterns, train)
    tails = [r for r in fused.fusion_report if r.endswith("Stage+residual")]
    assert tails == ["convs.0+bns.0+add+relu -> Stage+residual",
                     "convs.1+bns.1+add+relu -> Stage+residual",
                     "convs.2+bns.2+add+act -> Stage+residual",
                     "convs.3+bns.3+add -> Stage+residual",
                     "convs.4+bns.4+add -> Stage+residual"]
    assert sorted(r for r in fused.fusion_report if r not in tails) == [
        "convs.5+bns.5 -> Conv+BN", "convs.6+bns.6 -> Conv+BN"]
    assert [c.residual_activation for c in fused.convs[:5]] == [
        "relu", "relu", "hardswish", "none", "none"]
    assert type(fused) is ResidualPatterns and "forward" in vars(fused)
    assert set(fused.state_dict()) == set(model.state_dict())
    eager = check_same(model, fused, (2, 4, 6, 5))
    # The class's own forward (a fused conv called with one input) is still right.
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64)
    fused.eval(), eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(type(fused).forward(fused, x), eager(x), **F64)


class AliasedInplaceAdd(nn.Module):
    """``y += ...`` where another name still reads the old ``y``: torch.fx records an
    out-of-place add, so running the traced code would change the result."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = conv_bn()

    def forward(self, x):
        y = x * 2
        alias = y
        y += self.bn(self.conv(x))
        return y * alias


def test_inplace_add_into_an_aliased_tensor_is_not_replaced():
    model, fused = fused_double(AliasedInplaceAdd, False)
    assert fused.fusion_report == ["conv+bn -> Conv+BN"] and fused.forward.code is None
    check_same(model, fused, (2, 4, 5, 5))


def check_same(model, fused, shape, steps=2):
    """Outputs, input and parameter gradients, and running statistics of ``fused`` equal
    ``model``'s over ``steps`` calls (float64), in the mode the model is in."""
    eager = copy.deepcopy(model)  # (fused shares nothing with model unless inplace)
    for _ in range(steps):
        fused.zero_grad(set_to_none=True), eager.zero_grad(set_to_none=True)
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        xe = x.detach().clone().requires_grad_()
        torch.manual_seed(7)
        y = fused(x)
        torch.manual_seed(7)
        ye = eager(xe)
        close(y, ye)
        g = torch.randn_like(y)
        y.backward(g), ye.backward(g)
        close(x.grad, xe.grad)
        got, want = dict(fused.named_parameters()), dict(eager.named_parameters())
        for name, p in want.items():
            if p.grad is not None:
                close(got[name].grad, p.grad)
        for name, b in eager.named_buffers():
            close(fused.get_buffer(name), b)
    return eager


# (constructor, input size, {kind: count} of the report, {activation: count} of the fused convs)
MODELS = {
    "resnet18": (64, {"Stage": 9, "Stage+residual": 8, "Conv+BN": 3}, {"relu": 17}),
    "resnet50": (64, {"Stage": 33, "Stage+residual": 16, "Conv+BN": 4}, {"relu": 49}),
    "mobilenet_v2": (64, {"Stage": 35, "Stage+residual": 10, "Conv+BN": 7}, {"relu6": 35}),
    "mobilenet_v3_large": (64, {"Stage": 31, "Stage+residual": 10, "Conv+BN": 5},
                           {"relu": 11, "hardswish": 20}),
    "efficientnet_b0": (64, {"Stage": 33, "Conv+BN": 16}, {"silu": 33}),
    "regnet_y_400mf": (64, {"Stage": 33, "Stage+residual": 16, "Conv+BN": 4}, {"relu": 49}),
    "shufflenet_v2_x0_5": (64, {"Stage": 37, "Conv+BN": 19}, {"relu": 37}),
    "googlenet": (64, {"Stage": 57}, {"relu": 57}),
    "densenet121": (64, {"Stage": 59}, {"relu": 59}),
    "vgg11_bn": (32, {"Stage": 8}, {"relu": 8}),
}


def build(name):
    kw = dict(aux_logits=False, init_weights=True) if name == "googlenet" else {}
    if name == "vgg11_bn":  # a small classifier head: the 4096-wide one costs seconds
        model = torchvision.models.vgg11_bn(num_classes=10)
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Linear(512, 10)
    else:
        model = getattr(torchvision.models, name)(num_classes=10, **kw)
    return randomize_bn(model).double()


def activations(model):
    acts = Counter()
    for m in model.modules():
        if isinstance(m, FusedConv2d):
            for a in (m.activation, m.residual_activation):
                if a not in (None, "none"):
                    acts[a] += 1
    return dict(acts)


@pytest.mark.parametrize("name", list(MODELS))
def test_torchvision_model_fused_equals_original(name):
    torch.manual_seed(0)
    size, kinds, acts = MODELS[name]
    model = build(name).train()
    fused = neptune_ext.fuse_stages(model)
    assert dict(Counter(r.split("-> ")[1] for r in fused.fusion_report)) == kinds
    assert activations(fused) == acts
    assert type(fused) is type(model) and set(fused.state_dict()) == set(model.state_dict())
    # every BatchNorm2d that follows a conv is now a pass-through the conv computes
    assert sum(isinstance(m, FusedBatchNorm2d) for m in fused.modules()) == sum(kinds.values())
    model = check_same(model, fused, (2, 3, size, size), steps=1)  # train: batch statistics
    model.eval(), fused.eval()
    model = check_same(model, fused, (2, 3, size, size), steps=1)  # eval: folded, autograd
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():                                  # eval: folded, cached, in place
        close(fused(x), model(x))
    # float32 channels_last (oneDNN's fused primitives) within float32 rounding
    m32 = copy.deepcopy(model).float().to(memory_format=torch.channels_last)
    f32 = copy.deepcopy(fused).float().to(memory_format=torch.channels_last)
    x32 = x.float().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = m32(x32)
        got = f32(x32)
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-4, err


def test_fused_residual_models_copy_pickle_and_fuse_again():
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    fused = neptune_ext.fuse_stages(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        copied = copy.deepcopy(fused)
        block = copied.layer1[0]
        # the copy's block runs the copy's own modules (its fused conv: the copy's BN)
        assert isinstance(block, FusedBlock) and block.block_class is BasicBlock
        assert block.conv2.bn is block.bn2 and block.bn2 is not fused.layer1[0].bn2
        torch.testing.assert_close(copied(x), want, rtol=1e-4, atol=1e-5)
        buf = io.BytesIO()
        torch.save(fused, buf)  # whole-module pickling (state dicts need nothing special)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert loaded.layer2[1].conv1.bn is loaded.layer2[1].bn1
        torch.testing.assert_close(loaded(x), want, rtol=1e-4, atol=1e-5)
        again = neptune_ext.fuse_stages(fused)
        assert again.fusion_report == []
        torch.testing.assert_close(again(x), want, rtol=1e-4, atol=1e-5)
    # to() and a load_state_dict reach the modules the generated forward calls
    fused.double()
    fused.load_state_dict(model.double().state_dict())
    xd = x.double()
    with torch.no_grad():
        torch.testing.assert_close(fused(xd), model(xd), **F64)


def test_compiled_fused_residual_block_matches_eager():
    block = torchvision.models.resnet.BasicBlock(8, 8)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), block)).eval()
    fused = neptune_ext.fuse_stages(model)
    assert "2.conv2+bn2+add+relu -> Stage+residual" in fused.fusion_report
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_stage_paths_tell_how_each_fused_conv_ran():
    model = randomize_bn(torchvision.models.resnet18(num_classes=10))
    fused = neptune_ext.fuse_stages(model, memory_efficient=True).train()
    assert set(neptune_ext.stage_paths(fused).values()) == {None}
    x = torch.randn(2, 3, 32, 32)
    fused(x).sum().backward()
    paths = neptune_ext.stage_paths(fused)
    assert len(paths) == 20
    assert paths["conv1"] == paths["layer1.0.conv1"] == "bn-relu-kernel"
    assert paths["layer1.0.conv2"] == "conv-bn-recompute"          # a residual tail
    assert paths["layer2.0.downsample.0"] == "conv-bn-recompute"   # conv + BN
    fused.eval()
    with torch.no_grad():  # (64x64: no 1x1 feature map, which is NCHW and channels_last at once)
        fused(torch.randn(2, 3, 64, 64))
    from neptune_ext.stage.eval import onednn_fused_available
    # NCHW input: channels_last inside the model, oneDNN's fused convolutions
    assert set(neptune_ext.stage_paths(fused).values()) == (
        {"onednn-fused"} if onednn_fused_available() else {"conv+bias"})
    stage = neptune_ext.nn.Stage(3, 4, 3, activation="silu").train()
    stage(torch.randn(2, 3, 5, 5))
    assert neptune_ext.stage_paths(stage) == {"": "eager"}


def test_default_keeps_conv_outputs_and_matches_eager_memory_efficient_saves_less():
    from neptune_app.bench.stage import saved_bytes
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).double().train()
    lean = neptune_ext.fuse_stages(model, memory_efficient=True)
    fast = neptune_ext.fuse_stages(model)  # the default
    assert all(m.memory_efficient is False for m in fast.modules() if isinstance(m, FusedConv2d))
    check_same(model, fast, (2, 3, 32, 32), steps=1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    lean_mem = saved_bytes(lambda: lean(x), exclude=list(lean.parameters()))
    fast_mem = saved_bytes(lambda: fast(x), exclude=list(fast.parameters()))
    eager_mem = saved_bytes(lambda: model(x), exclude=list(model.parameters()))
    assert lean_mem < fast_mem <= 1.05 * eager_mem
