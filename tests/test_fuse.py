"""fuse_stages: Conv2d -> BatchNorm2d -> ReLU chains of whole models become Stages."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neptune_ext
from neptune_ext.nn import Stage
from neptune_ext.nn.stage import FoldedConv2d

torchvision = pytest.importorskip("torchvision")

from neptune_ext.bench.stage import randomize_bn  # noqa: E402  (shared with the benchmark)

F64 = dict(rtol=1e-10, atol=1e-10)


def count(model, kind):
    return sum(1 for m in model.modules() if isinstance(m, kind))


RESNET18_STAGES = ["conv1+bn1+relu -> Stage"] + [
    f"layer{i}.{j}.conv1+bn1+relu -> Stage" for i in range(1, 5) for j in range(2)]
RESNET18_FOLDS = [f"layer{i}.{j}.conv2+bn2 -> Conv2d (BN folded)" for i in range(1, 5) for j in range(2)] + [
    f"layer{i}.0.downsample.0+1 -> Conv2d (BN folded)" for i in range(2, 5)]


def test_resnet18_eval_matches_eager(capsys):
    model = randomize_bn(torchvision.models.resnet18()).eval()
    fused = neptune_ext.fuse_stages(model, verbose=True)
    assert sorted(fused.fusion_report) == sorted(RESNET18_STAGES + RESNET18_FOLDS)
    printed = capsys.readouterr().out
    assert "layer1.0.conv1+bn1+relu -> Stage" in printed and "20 fusion(s)" in printed
    assert count(fused, Stage) == 9 and count(fused, nn.BatchNorm2d) == 9  # the Stages' own BNs
    assert isinstance(fused.get_submodule("layer1.0.conv1"), Stage)
    assert isinstance(fused.get_submodule("layer1.0.conv2"), FoldedConv2d)
    assert count(fused, FoldedConv2d) == 11
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        for memory_format in (torch.contiguous_format, torch.channels_last):
            m = fused.to(memory_format=memory_format)
            got = m(x.contiguous(memory_format=memory_format))
            err = ((got - expected).norm() / expected.norm()).item()
            assert err < 1e-5, (memory_format, err)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_folded_conv_prepacked_weight_follows_the_weight():
    conv = FoldedConv2d(8, 16, 3, padding=1)
    ref = nn.Conv2d(8, 16, 3, padding=1)
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for _ in range(2):
            y = conv(x)
            torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
            assert y.is_contiguous(memory_format=torch.channels_last)
            conv.weight.mul_(-0.5), ref.weight.mul_(-0.5)  # in place: must repack
        torch.testing.assert_close(conv(x.contiguous()), ref(x.contiguous()), rtol=1e-5, atol=1e-5)
    x.requires_grad_()
    conv(x).sum().backward()  # autograd path: plain conv2d
    assert conv.weight.grad is not None and x.grad is not None


def test_other_torchvision_resnets_fuse():
    for name, stages in (("resnet34", 1 + 16), ("resnet50", 1 + 2 * 16)):
        model = getattr(torchvision.models, name)().eval()
        fused = neptune_ext.fuse_stages(model)
        assert sum(r.endswith("-> Stage") for r in fused.fusion_report) == stages
        assert count(fused, Stage) == stages


def test_resnet18_training_tracks_eager():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).double().train()
    fused = neptune_ext.fuse_stages(model)
    assert sorted(fused.fusion_report) == sorted(RESNET18_STAGES)  # no folds in training
    assert count(fused, nn.BatchNorm2d) == 20
    opt_e = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
        target = torch.randint(0, 10, (4,))
        losses = []
        for m, opt in ((model, opt_e), (fused, opt_f)):
            opt.zero_grad()
            loss = F.cross_entropy(m(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-9)
    # Same parameters and buffers, under the fused model's names.
    fused_state = fused.state_dict()
    for key, value in model.state_dict().items():
        mapped = key
        for i in [""] + [f"layer{a}.{b}." for a in range(1, 5) for b in range(2)]:
            if key.startswith(i + "conv1.") and "downsample" not in key:
                mapped = i + "conv1.conv." + key[len(i + "conv1."):]
            if key.startswith(i + "bn1."):
                mapped = i + "conv1.bn." + key[len(i + "bn1."):]
        # Rounding differences (BN arithmetic order) grow a little over SGD steps.
        torch.testing.assert_close(fused_state[mapped], value, rtol=1e-7, atol=1e-8)
    model.eval(), fused.eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        torch.testing.assert_close(fused(x), model(x), rtol=1e-7, atol=1e-8)


class Patterns(nn.Module):
    """ReLU in every spelling, a shared ReLU module, and chains that must not fuse."""

    def __init__(self):
        super().__init__()
        c = 4
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1, bias=i == 1) for i in range(8))
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(8))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.relu(self.bns[0](self.convs[0](x)))          # shared module, inplace
        x = F.relu(self.bns[1](self.convs[1](x)))              # F.relu; conv with bias
        x = torch.relu(self.bns[2](self.convs[2](x)))          # torch.relu
        x = self.bns[3](self.convs[3](x)).relu()               # method
        y = self.convs[4](x)                                   # conv output used twice
        x = self.relu(self.bns[4](y)) + y
        z = self.bns[5](self.convs[5](x))                      # bn output used twice
        x = self.relu(z) * z
        x = F.relu(self.bns[6](self.convs[6](x)), inplace=True)  # F.relu(inplace=True)
        return torch.sigmoid(self.bns[7](self.convs[7](x)))     # no ReLU: fold in eval only


@pytest.mark.parametrize("train", [True, False])
def test_patterns(train):
    torch.manual_seed(0)
    model = randomize_bn(Patterns().double()).train(train)
    fused = neptune_ext.fuse_stages(model)
    stages = [r for r in fused.fusion_report if r.endswith("-> Stage")]
    assert stages == ["convs.0+bns.0+relu -> Stage", "convs.1+bns.1+relu -> Stage",
                      "convs.2+bns.2+relu -> Stage", "convs.3+bns.3+relu -> Stage",
                      "convs.6+bns.6+relu -> Stage"]
    folds = [r for r in fused.fusion_report if r.endswith("folded)")]
    if train:
        assert folds == []
    else:  # conv4's output is used twice: left alone; conv5 -> bn5 and conv7 -> bn7 fold
        assert folds == ["convs.5+bns.5 -> Conv2d (BN folded)", "convs.7+bns.7 -> Conv2d (BN folded)"]
    eager = copy.deepcopy(model)
    for _ in range(2):
        x = torch.randn(2, 4, 6, 5, dtype=torch.float64, requires_grad=True)
        xe = x.detach().clone().requires_grad_()
        y, ye = fused(x), eager(xe)
        torch.testing.assert_close(y, ye, **F64)
        y.sum().backward(), ye.sum().backward()
        torch.testing.assert_close(x.grad, xe.grad, **F64)


class Untraceable(nn.Module):
    """Data-dependent control flow at the top: fused child by child."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        x = self.a(x)
        if x.sum() > 0:
            x = self.b(x)
        return x


def test_untraceable_model_is_fused_per_child():
    model = randomize_bn(Untraceable().double()).eval()
    fused = neptune_ext.fuse_stages(model)
    assert type(fused) is Untraceable
    assert fused.fusion_report == ["a.0+1+2 -> Stage", "b.0+1+2 -> Stage"]
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), **F64)


def test_not_inplace_leaves_the_model_alone_and_inplace_reuses_modules():
    model = randomize_bn(torchvision.models.resnet18()).eval()
    before = copy.deepcopy(model.state_dict())
    fused = neptune_ext.fuse_stages(model)
    assert fused is not model and isinstance(model.conv1, nn.Conv2d)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    fused_inplace = neptune_ext.fuse_stages(model, inplace=True)
    assert fused_inplace.get_submodule("layer1.0.conv1").conv is model.layer1[0].conv1


class ScaledConv(nn.Conv2d):
    def forward(self, x):
        return 2 * super().forward(x)


def test_conv_subclasses_with_their_own_forward_are_left_alone():
    model = nn.Sequential(ScaledConv(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).double().eval()
    fused = neptune_ext.fuse_stages(model)
    assert fused.fusion_report == []
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), **F64)


def test_nothing_to_fuse_returns_the_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten())
    fused = neptune_ext.fuse_stages(model)
    assert type(fused) is nn.Sequential and fused.fusion_report == []
    assert neptune_ext.nn.fuse_stages is neptune_ext.fuse_stages


def test_bad_model_raises():
    with pytest.raises(ValueError, match="model must be an nn.Module"):
        neptune_ext.fuse_stages(lambda x: x)
