"""fuse_stages: Conv2d -> BatchNorm2d (-> ReLU) chains of whole models run fused, and the
fused model stays the original in every other respect (type, mode switches, state dict)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neptune_ext

from neptune_ext.stage.module import FoldedConv2d, FusedBatchNorm2d, FusedConv2d

torchvision = pytest.importorskip("torchvision")

from neptune_app.bench.stage import randomize_bn  # noqa: E402  (shared with the benchmark)
from stage_helpers import fused_double  # noqa: E402

F64 = dict(rtol=1e-10, atol=1e-10)


def count(model, kind):
    return sum(1 for m in model.modules() if isinstance(m, kind))


def count_stages(model):
    return sum(1 for m in model.modules() if isinstance(m, FusedConv2d) and m.relu_fused)


RESNET18_STAGES = ["conv1+bn1+relu -> Stage"] + [
    f"layer{i}.{j}.conv1+bn1+relu -> Stage" for i in range(1, 5) for j in range(2)]
RESNET18_TAILS = [f"layer{i}.{j}.conv2+bn2+add+relu -> Stage+residual"
                  for i in range(1, 5) for j in range(2)]
RESNET18_FOLDS = RESNET18_TAILS + [f"layer{i}.0.downsample.0+1 -> Conv+BN" for i in range(2, 5)]


def count_tails(model):
    return sum(1 for m in model.modules()
               if isinstance(m, FusedConv2d) and m.residual_activation is not None)


def test_resnet18_eval_matches_eager(capsys):
    model = randomize_bn(torchvision.models.resnet18()).eval()
    fused = neptune_ext.fuse_stages(model, verbose=True)
    assert sorted(fused.fusion_report) == sorted(RESNET18_STAGES + RESNET18_FOLDS)
    printed = capsys.readouterr().out
    assert "layer1.0.conv1+bn1+relu -> Stage" in printed and "20 fusion(s)" in printed
    assert type(fused) is type(model) and set(fused.state_dict()) == set(model.state_dict())
    assert count_stages(fused) == 9 and count(fused, FusedConv2d) == 20 and count_tails(fused) == 8
    assert count(fused, FusedBatchNorm2d) == 20
    assert isinstance(fused.get_submodule("layer1.0.conv2"), FusedConv2d)
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
        assert count_stages(fused) == stages
        assert sum(r.endswith("+add+relu -> Stage+residual") for r in fused.fusion_report) == 16
        assert count_tails(fused) == 16


def test_resnet18_training_tracks_eager():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).double().train()
    fused = neptune_ext.fuse_stages(model)
    assert sorted(fused.fusion_report) == sorted(RESNET18_STAGES + RESNET18_FOLDS)
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
    # Same parameters and buffers, under the same names.
    fused_state = fused.state_dict()
    assert set(fused_state) == set(model.state_dict())
    for key, value in model.state_dict().items():
        # Rounding differences (BN arithmetic order) grow a little over SGD steps.
        torch.testing.assert_close(fused_state[key], value, rtol=1e-7, atol=1e-8)
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
    model, fused = fused_double(Patterns, train)
    stages = [r for r in fused.fusion_report if r.endswith("-> Stage")]
    assert stages == ["convs.0+bns.0+relu -> Stage", "convs.1+bns.1+relu -> Stage",
                      "convs.2+bns.2+relu -> Stage", "convs.3+bns.3+relu -> Stage",
                      "convs.6+bns.6+relu -> Stage"]
    # conv4's output is used twice: left alone; conv5 -> bn5 and conv7 -> bn7 fuse without ReLU
    folds = [r for r in fused.fusion_report if r.endswith("-> Conv+BN")]
    assert folds == ["convs.5+bns.5 -> Conv+BN", "convs.7+bns.7 -> Conv+BN"]
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
    model, fused = fused_double(Untraceable, False, seed=None)
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
    assert fused_inplace is model and isinstance(model.layer1[0].conv1, FusedConv2d)


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


class ModeDependent(nn.Module):
    """``if self.training:``, F.dropout(training=self.training) and stochastic depth."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.depth = torchvision.ops.StochasticDepth(0.5, "row")

    def forward(self, x):
        x = self.a(x)
        if self.training:
            x = x * 3.0
        x = F.dropout(x, 0.5, training=self.training)
        return x + self.depth(self.b(x))


@pytest.mark.parametrize("fuse_in_train", [True, False])
def test_mode_switches_after_fusion_behave_like_the_original(fuse_in_train):
    model, fused = fused_double(ModeDependent, fuse_in_train, seed=None)
    assert type(fused) is ModeDependent
    assert fused.fusion_report == ["a.0+1+2 -> Stage", "b.0+1+2 -> Stage"]
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    for mode in (not fuse_in_train, fuse_in_train, False):
        model.train(mode), fused.train(mode)
        torch.manual_seed(1)
        want = model(x)
        torch.manual_seed(1)
        got = fused(x)
        torch.testing.assert_close(got, want, **F64)
        if not mode:  # no dropout, no stochastic depth, no x3 branch: deterministic
            torch.testing.assert_close(fused(x), got, rtol=0, atol=0)
    torch.testing.assert_close(fused.state_dict()["a.1.running_mean"], model.state_dict()["a.1.running_mean"],
                               **F64)


def test_googlenet_fused_in_train_returns_what_googlenet_returns_in_each_mode():
    torch.manual_seed(0)
    model = torchvision.models.googlenet(aux_logits=True, init_weights=True).train()
    fused = neptune_ext.fuse_stages(model)
    assert len(fused.fusion_report) > 50 and type(fused) is type(model)
    x = torch.randn(2, 3, 64, 64)
    out = fused(x)
    assert type(out).__name__ == "GoogLeNetOutputs" and out.aux_logits1 is not None
    model(x)  # the same running-statistics update
    fused.eval(), model.eval()
    with torch.no_grad():
        got, want = fused(x), model(x)
    assert isinstance(got, torch.Tensor)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_state_dicts_load_both_ways():
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    fused = neptune_ext.fuse_stages(model)
    other = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    fused.load_state_dict(other.state_dict())          # original -> fused (fuse, then load)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), other(x), rtol=1e-4, atol=1e-5)
    fresh = torchvision.models.resnet18(num_classes=10).eval()
    fresh.load_state_dict(fused.state_dict())          # fused -> original
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), other(x), rtol=0, atol=0)
    # A fold cached before a load_state_dict is not reused after it.
    with torch.no_grad():
        fused(x)
        fused.load_state_dict(model.state_dict())
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)


def test_eval_with_gradients_and_inplace_relu_after_a_fused_conv():
    model = randomize_bn(torchvision.models.resnet18()).double().eval()
    fused = neptune_ext.fuse_stages(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    fused(x).sum().backward()
    g, x.grad = x.grad, None
    model(x).sum().backward()
    torch.testing.assert_close(g, x.grad, **F64)


def _paths_of(fn):
    from neptune_ext.stage.eval import eval_path_counts, reset_eval_path_counts
    reset_eval_path_counts()
    fn()
    return eval_path_counts()


def test_stage_eval_paths_are_reported():
    """neptune_ext.info() tells which path the Stages' evaluation convolutions took."""
    fused = neptune_ext.fuse_stages(randomize_bn(torchvision.models.resnet18()).eval())
    x = torch.randn(1, 3, 64, 64)
    from neptune_ext.stage.eval import onednn_fused_available
    with torch.no_grad():
        nchw = _paths_of(lambda: fused(x))
        # NCHW callers: channels_last inside the model (one conversion), oneDNN fused
        assert nchw == ({"onednn-fused": 20} if onednn_fused_available() else {"conv+bias": 20})
        # A block called by itself with NCHW input: conv2d with its bias (+ in-place ReLU)
        assert _paths_of(lambda: fused.layer1(torch.randn(1, 64, 8, 8))) == {"conv+bias": 4}
        if onednn_fused_available():
            m = fused.to(memory_format=torch.channels_last)
            cl = _paths_of(lambda: m(x.contiguous(memory_format=torch.channels_last)))
            assert cl == {"onednn-fused": 20}  # the 8 residual tails too (add + ReLU post-ops)
    x.requires_grad_()
    assert _paths_of(lambda: fused(x)) == {"autograd": 20}
    assert "stage_eval_paths" in neptune_ext.info.info_dict()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_resnet18_eval_on_cuda_takes_cudnn_fused_path(dtype, memory_format):
    model = randomize_bn(torchvision.models.resnet18()).eval().cuda().to(memory_format=memory_format)
    fused = neptune_ext.fuse_stages(copy.deepcopy(model))
    x = torch.randn(4, 3, 96, 96, device="cuda").contiguous(memory_format=memory_format)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        expected = model(x).float()
    with torch.no_grad():
        got = fused.to(dtype)(x.to(dtype)) if dtype != torch.float32 else fused(x)
        paths = _paths_of(lambda: fused(x.to(dtype)))
    err = ((got.float() - expected).norm() / expected.norm()).item()
    assert err < (1e-2 if dtype != torch.float32 else 1e-3), err
    assert paths.get("cudnn-fused", 0) + paths.get("conv+bias", 0) == 20
    if dtype == torch.float32:
        # the 9 conv+BN+ReLU stages and the 8 residual tails (cudnn_convolution_add_relu)
        assert paths.get("cudnn-fused", 0) == 17, paths


@pytest.mark.cuda
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_resnet18_under_cuda_autocast_eval_and_train(memory_format):
    """bf16 autocast on CUDA: eval without autograd takes cuDNN's fused calls in bfloat16
    (as close to float32 as eager under autocast); training runs the fused BN+ReLU kernel on
    the bfloat16 conv and matches eager's running statistics and gradients closely."""
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18()).cuda().to(memory_format=memory_format).eval()
    fused = neptune_ext.fuse_stages(model)
    x = torch.randn(4, 3, 96, 96, device="cuda").contiguous(memory_format=memory_format)
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            want = model(x)
            paths = _paths_of(lambda: fused(x))
            got = fused(x)
    assert got.dtype == want.dtype == torch.bfloat16
    assert rel(got, ref) <= 2 * rel(want, ref) + 5e-3
    assert paths.get("cudnn-fused", 0) == 17, paths
    eager = copy.deepcopy(model).train()
    fused.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, ye = fused(x), eager(x)
    assert y.dtype == ye.dtype
    assert rel(y, ye.float()) < 2e-2
    y.float().square().mean().backward(), ye.float().square().mean().backward()
    for (name, p), pe in zip(fused.named_parameters(), eager.parameters()):
        assert rel(p.grad, pe.grad) < 5e-2, name
    for (name, b), be in zip(fused.named_buffers(), eager.buffers()):
        if b.is_floating_point():
            torch.testing.assert_close(b, be, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("act", [nn.ReLU, nn.SiLU])
def test_an_empty_training_batch_behaves_as_eager(act, autocast):
    """N = 0 in training: an empty output, the BN's batch counter stepped, the running
    statistics unchanged and zero gradients - what the eager modules do (a fused Stage
    raised "Expected more than 1 value per channel")."""
    import copy
    eager = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), act()).train()
    fused = neptune_ext.fuse_stages(copy.deepcopy(eager))
    results = []
    for m in (eager, fused):
        x = torch.randn(0, 3, 8, 8, requires_grad=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            y = m(x)
        y.float().sum().backward()
        bn = next(b for b in m.modules() if isinstance(b, nn.BatchNorm2d))
        conv = next(c for c in m.modules() if isinstance(c, nn.Conv2d))
        results.append((y.shape, int(bn.num_batches_tracked), bn.running_mean.clone(),
                        bn.running_var.clone(), x.grad.shape, conv.weight.grad.clone()))
    for a, b in zip(*results):
        assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b)


def test_tracers_get_a_clear_refusal():
    """torch.jit.trace and torch.fx.symbolic_trace cannot record a fused model: a RuntimeError
    that says so and what to use (the tracers' own errors were an internal assert and
    "input must be a torch.Tensor, got Proxy")."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten()).eval()
    fused = neptune_ext.fuse_stages(model)
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(RuntimeError, match="cannot be traced with torch.jit.trace; use torch.compile"):
        torch.jit.trace(fused, x)
    with pytest.raises(RuntimeError, match="cannot be traced with torch.fx; use torch.compile"):
        torch.fx.symbolic_trace(fused)
    torch.testing.assert_close(fused(x), model(x))


@pytest.mark.parametrize("train", [False, True])
def test_torch_export_of_a_fused_model(train):
    """torch.export.export of a fused model (its root a residual block, whose forward the
    fused code replaces) exports what the original computes, in eval and in training (running
    statistics updated as the eager model updates them), with a dynamic batch size, and
    survives torch.export.save/load. (It failed on the fused root's instance forward: "object
    has no attribute '__code__'".)"""
    import io

    from torchvision.models.resnet import BasicBlock
    torch.manual_seed(0)
    eager = BasicBlock(8, 8).double().train(train)
    randomize_bn(eager)
    fused = neptune_ext.fuse_stages(copy.deepcopy(eager))
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    batch = torch.export.Dim("batch", min=1, max=16)
    ep = torch.export.export(fused, (x,), dynamic_shapes={"x": {0: batch}})
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    exported = torch.export.load(buf).module()
    x5 = torch.randn(5, 8, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(exported(x5), eager(x5))
    mine, theirs = dict(exported.named_buffers()), dict(eager.named_buffers())
    assert mine.keys() == theirs.keys()
    for name, buf in theirs.items():
        torch.testing.assert_close(mine[name], buf, msg=name)


def test_the_fused_forward_keeps_the_signature_tools_see():
    """The fused root's forward reports the signature and code of the forward it stands for
    (what torch.export binds inputs with), and none where that forward has none; the class
    itself stays a plain class to inspect."""
    import functools
    import inspect

    from neptune_ext.stage.fuse.layout import CallerLayout
    assert str(inspect.signature(CallerLayout)) == "(module, inner=None, code=None)"
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    fused = neptune_ext.fuse_stages(model)
    assert str(inspect.signature(fused.forward)) == "(input)"
    assert fused.forward.__code__ is nn.Sequential.forward.__code__

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())

        def run(self, x, scale=1.0):
            return self.body(x) * scale
    holder = Holder().eval()
    holder.forward = functools.partial(Holder.run, holder)
    fused = neptune_ext.fuse_stages(copy.deepcopy(holder))
    assert str(inspect.signature(fused.forward)) == "(x, scale=1.0)"
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(torch.export.export(fused, (x,)).module()(x), holder(x))
    bare = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    bare.forward = torch.relu  # a builtin: no signature, no code
    fused = neptune_ext.fuse_stages(bare)
    assert not hasattr(fused.forward, "__signature__") and not hasattr(fused.forward, "__code__")
    assert str(inspect.signature(fused.forward)) == "(*args, **kwargs)"
