"""A fused model replicated as nn.DataParallel replicates it: each replica computes with its
own parameters and buffers only. torch.nn.parallel.replicate runs here as it is, on the CPU:
its broadcast (CUDA only) is replaced by clones, one set per "device"."""
import copy
import importlib

import pytest
import torch
from torch import nn

import neptune_ext
from neptune_app.bench.stage import randomize_bn
from neptune_ext.stage.fuse.block import FusedBlock
from neptune_ext.stage.module import FusedBatchNorm2d, FusedConv2d

torchvision = pytest.importorskip("torchvision")


@pytest.fixture
def cpu_replicate(monkeypatch):
    """torch.nn.parallel.replicate with CPU "devices": every broadcast is a clone (in autograd
    when not detached, as the real broadcast is)."""
    def broadcast(tensors, devices, detach=False):
        return [[t.detach().clone() if detach else t.clone() for t in tensors] for _ in devices]

    mod = importlib.import_module("torch.nn.parallel.replicate")
    monkeypatch.setattr(mod, "_broadcast_coalesced_reshape", broadcast)
    monkeypatch.setattr(mod, "_get_device_index", lambda device, optional=False: device)
    return mod.replicate


class Tails(nn.Module):
    """A residual tail in the root's own forward, and a torchvision block below it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.block = torchvision.models.resnet.BasicBlock(8, 8)
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.block(self.stem(x))
        return torch.relu(self.bn(self.conv(x)) + x)


def _poison(model):
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.fill_(float("nan"))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("make", [Tails, lambda: torchvision.models.resnet18(num_classes=10)],
                         ids=["root-tails", "resnet18"])
def test_replicas_use_their_own_tensors(cpu_replicate, make, train):
    torch.manual_seed(0)
    model = randomize_bn(make().double()).train(train)
    fused = neptune_ext.fuse_stages(model)
    assert any("Stage+residual" in r for r in fused.fusion_report)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    eager = copy.deepcopy(model)
    if not train:
        with torch.no_grad():
            fused(x)  # (a fold cached from the original's tensors)
    replicas = cpu_replicate(fused, [0, 1])
    _poison(fused)
    for replica in replicas:
        want = copy.deepcopy(eager)(x)
        got = replica(x)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-8 * want.abs().max().item())
        if train:  # gradients reach the original's parameters through the broadcast
            got.sum().backward()
    if train:
        assert all(p.grad is not None for p in fused.parameters())


def test_replicated_modules_are_the_replicas_own(cpu_replicate):
    fused = neptune_ext.fuse_stages(randomize_bn(torchvision.models.resnet18()).eval())
    replica = cpu_replicate(fused, [0])[0]
    block = replica.layer1[0]
    assert isinstance(block, FusedBlock) and block is not fused.layer1[0]
    assert isinstance(block.conv2, FusedConv2d) and isinstance(block.bn2, FusedBatchNorm2d)
    assert block.conv2.bn is block.bn2 and block.bn2 is not fused.layer1[0].bn2
    assert replica.forward.module is replica and fused.forward.module is fused
    assert replica.conv1._fold is not fused.conv1._fold
