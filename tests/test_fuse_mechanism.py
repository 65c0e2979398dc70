"""How fuse_stages changes a model: new modules registered in the parents in place of the
fused ones, sharing their tensors (no module changes class), residual blocks replaced by a
FusedBlock that holds the block's own state, and the module tree showing what computes."""
import copy

import pytest
import torch
from torch import nn

import neptune_ext
from neptune_app.bench.stage import randomize_bn
from neptune_ext.stage.fuse.block import FusedBlock
from neptune_ext.stage.module import FusedBatchNorm2d, FusedConv2d, FusedReLU

torchvision = pytest.importorskip("torchvision")

BasicBlock = torchvision.models.resnet.BasicBlock


def _resnet():
    torch.manual_seed(0)
    return randomize_bn(torchvision.models.resnet18(num_classes=10)).double()


def test_fused_modules_are_new_modules_sharing_the_originals_tensors():
    model = _resnet().eval()
    before = {name: type(m) for name, m in model.named_modules()}
    block, conv, bn = model.layer1[0], model.layer1[0].conv1, model.layer1[0].bn1
    tensors = {name: t for name, t in list(model.named_parameters()) + list(model.named_buffers())}
    fused = neptune_ext.fuse_stages(model, inplace=True)
    assert fused is model
    # The modules taken out keep their class (references held before fusing stay usable).
    assert type(block) is BasicBlock and type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d
    new_block = fused.layer1[0]
    assert isinstance(new_block, FusedBlock) and new_block.block_class is BasicBlock
    assert new_block.stride == block.stride  # plain attributes carried over
    assert type(new_block.conv1) is FusedConv2d and new_block.conv1.weight is conv.weight
    assert type(new_block.bn1) is FusedBatchNorm2d and new_block.bn1.running_var is bn.running_var
    assert type(new_block.relu) is FusedReLU
    # Same names in the same order, the very same tensors.
    now = list(fused.named_parameters()) + list(fused.named_buffers())
    assert [n for n, _ in now] == list(tensors) and all(t is tensors[n] for n, t in now)
    assert [n for n, _ in fused.named_modules()] == list(before)
    # print shows what computes; the conv shows the BN it computes with.
    text = repr(fused.layer1)
    assert "BasicBlockFused(" in text and "FusedConv2d(" in text and "(bn): FusedBatchNorm2d" in text
    assert "bn." not in "".join(fused.state_dict())  # (never layer1.0.conv1.bn.weight)
    assert "conv2_1 = self.conv2(relu, x)" in new_block.fused_code.source


def test_an_optimizer_built_before_fusing_trains_the_fused_model():
    model = _resnet().train()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    neptune_ext.fuse_stages(model, inplace=True)
    fused_later = neptune_ext.fuse_stages(reference)
    opt_later = torch.optim.SGD(fused_later.parameters(), lr=0.01, momentum=0.9)
    for _ in range(2):
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        for m, o in ((model, opt), (fused_later, opt_later)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for (name, p), q in zip(model.named_parameters(), fused_later.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_hooks_on_a_replaced_block_stay_and_their_handles_still_remove_them():
    model = _resnet().eval()
    calls = []
    handle = model.layer1[0].register_forward_hook(lambda m, a, out: calls.append(out.shape))
    fused = neptune_ext.fuse_stages(model, inplace=True)
    calls.clear()  # (the trace called it too)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        fused(x)
        assert len(calls) == 1
        handle.remove()
        fused(x)
    assert len(calls) == 1


class HeldInAList(nn.Module):
    """A conv called through a plain list: replacing it in its parent would leave the list
    calling the unfused conv, ahead of a pass-through BN."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU()
        self.head, self.head_bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.route = [self.conv]

    def forward(self, x):
        return self.head_bn(self.head(self.act(self.bn(self.route[0](x)))))


def test_a_module_also_held_outside_the_module_tree_is_left_unfused():
    torch.manual_seed(0)
    model = randomize_bn(HeldInAList()).double().eval()
    fused = neptune_ext.fuse_stages(model)
    assert fused.fusion_report == ["head+head_bn -> Conv+BN"]
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-10, atol=1e-10)


def test_a_standalone_fused_conv_keeps_its_bn_out_of_its_names_and_state_dict():
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    fused = FusedConv2d.convert(conv, bn, activation="relu")
    assert type(conv) is nn.Conv2d and fused.weight is conv.weight and fused.bn is bn
    assert [n for n, _ in fused.named_modules()] == [""] and list(fused.children()) == []
    assert set(fused.state_dict()) == {"weight", "bias"}
    fused.load_state_dict(conv.state_dict())  # strict: nothing missing for the BN


class _VersionedBlock(nn.Module):
    """A residual block with what a class gives its instances: a class attribute, a method
    using super(), a property, a state-dict version and a loader converting old keys."""
    _version = 2  # version 1 checkpoints called the conv "c"
    expansion = 3

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + x)

    def scaled(self, x, s):
        return super().__call__(x) * s

    @property
    def width(self):
        return self.conv.out_channels

    def _load_from_state_dict(self, sd, prefix, metadata, *args):
        if metadata.get("version", 1) < 2 and prefix + "c.weight" in sd:
            sd[prefix + "conv.weight"] = sd.pop(prefix + "c.weight")
        super()._load_from_state_dict(sd, prefix, metadata, *args)


def test_a_fused_block_keeps_what_its_class_gives():
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(_VersionedBlock(), _VersionedBlock())).double().eval()
    fused = neptune_ext.fuse_stages(model)
    assert len(fused.fusion_report) == 2
    block = fused[0]
    assert isinstance(block, FusedBlock) and isinstance(block, _VersionedBlock)
    assert type(block).__name__ == "_VersionedBlockFused" and block.block_class is _VersionedBlock
    assert block.expansion == 3 and block.width == 4
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block.scaled(x, 2.0), model[0].scaled(x, 2.0))
        torch.testing.assert_close(fused(x), model(x))
    # the state dict's version, and the class's own loader for old checkpoints
    assert fused.state_dict()._metadata["0"]["version"] == 2
    old = type(model.state_dict())((("0.c.weight" if k == "0.conv.weight" else k), v)
                                   for k, v in model.state_dict().items())
    old._metadata = {"0": {"version": 1}}
    fresh = neptune_ext.fuse_stages(nn.Sequential(_VersionedBlock(), _VersionedBlock()).double().eval())
    fresh.load_state_dict(old)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
    # copies and pickles rebuild the generated class from the block's
    for other in (copy.deepcopy(fused), torch.load(_saved(fused), weights_only=False)):
        assert type(other[0]) is type(block)
        with torch.no_grad():
            torch.testing.assert_close(other(x), model(x))


def _saved(model):
    import io
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return buf


def test_chains_left_unfused_for_sharing_are_reported():
    class HeldTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.c2, self.b2 = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
            self.taps = [self.c2]  # a plain-list reference: the conv is held twice

        def forward(self, x):
            return self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))

    fused = neptune_ext.fuse_stages(HeldTwice().eval())
    assert fused.fusion_report == ["c1+b1+relu -> Stage"]
    assert any(line.startswith("c2+b2 -> unfused:") and "more than one place" in line
               for line in fused.fusion_skipped), fused.fusion_skipped


def test_a_residual_that_broadcasts_the_output_up_computes_as_the_model_does():
    class Grows(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

        def forward(self, x):  # x [1, C, H, W]; the identity [3, C, H, W]
            return torch.relu(self.bn(self.conv(x)) + x.expand(3, -1, -1, -1))

    torch.manual_seed(0)
    model = randomize_bn(Grows()).double()
    fused = neptune_ext.fuse_stages(model)
    assert fused.fusion_report == ["conv+bn+add+relu -> Stage+residual"]
    for mode in (False, True):
        model.train(mode), fused.train(mode)
        x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
        torch.testing.assert_close(fused(x), model(x))
