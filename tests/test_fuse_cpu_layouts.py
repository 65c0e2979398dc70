"""fuse_stages on the CPU as users call it: the original's values and memory format for NCHW
and channels_last input at batch 1 and 8 (float64, float32, bf16 autocast), and the eval
caches (fold, oneDNN-packed weight) reused across calls under torch.inference_mode and
rebuilt after any in-place change of a parameter or buffer."""
import pytest
import torch
from torch import nn

import neptune_ext
from neptune_ext.stage.module import FusedConv2d
from neptune_ext.stage import functional as stage_ops

torchvision = pytest.importorskip("torchvision")

from neptune_app.bench.stage import randomize_bn  # noqa: E402  (shared with the benchmark)

F64 = dict(rtol=1e-10, atol=1e-10)


def _layout(x, kind):
    return x.contiguous(memory_format=torch.channels_last if kind == "channels_last"
                        else torch.contiguous_format)


def _same_format(got, expected):
    for fmt in (torch.contiguous_format, torch.channels_last):
        assert got.is_contiguous(memory_format=fmt) == expected.is_contiguous(memory_format=fmt)
    assert got.stride() == expected.stride()


class Backbone(nn.Module):
    """A small feature extractor that returns its feature maps (as detection backbones do)
    with ResNet-style residual blocks, a depthwise stage and a stride."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = torchvision.models.resnet.BasicBlock(8, 8)
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False), nn.BatchNorm2d(8),
                                nn.ReLU6(), nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))

    def forward(self, x):
        a = self.block(self.stem(x))
        return a, self.dw(a)


def _pair(dtype):
    torch.manual_seed(0)
    model = randomize_bn(Backbone()).to(dtype).eval()
    return model, neptune_ext.fuse_stages(model)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("batch", [1, 8])
def test_feature_maps_keep_values_and_memory_format(dtype, kind, batch):
    model, fused = _pair(dtype)
    if kind == "channels_last":
        model, fused = (m.to(memory_format=torch.channels_last) for m in (model, fused))
    x = _layout(torch.randn(batch, 3, 12, 12, dtype=dtype), kind)
    tol = F64 if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            expected = model(x)
            for _ in range(2):  # the second call on the caches
                got = fused(x)
                for g, e in zip(got, expected):
                    torch.testing.assert_close(g, e, **tol)
                    _same_format(g, e)
    if dtype == torch.float32 and stage_ops.onednn_fused_available():
        # NCHW callers too: every conv on oneDNN's fused path (channels_last inside)
        assert set(neptune_ext.stage_paths(fused).values()) <= {"onednn-fused", "onednn+activation"}


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("batch", [1, 8])
def test_mobilenet_matches_original(kind, batch):
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.mobilenet_v2(width_mult=0.25)).eval()
    fused = neptune_ext.fuse_stages(model)
    if kind == "channels_last":
        model, fused = (m.to(memory_format=torch.channels_last) for m in (model, fused))
    x = _layout(torch.randn(batch, 3, 32, 32), kind)
    with torch.inference_mode():
        expected = model(x)
        got = fused(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    _same_format(got, expected)


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_bf16_autocast_within_autocasts_own_error(kind):
    model, fused = _pair(torch.float32)
    if kind == "channels_last":
        model, fused = (m.to(memory_format=torch.channels_last) for m in (model, fused))
    x = _layout(torch.randn(8, 3, 12, 12), kind)
    with torch.inference_mode():
        exact = model.double()(x.double())
        model.float()
        fused(x), fused(x)  # float32 calls first: their replay must not serve autocast's
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eager, got = model(x), fused(x)
    for g, e, ref in zip(got, eager, exact):
        assert g.dtype == e.dtype
        _same_format(g, e)
        err, eager_err = ((g.double() - ref).norm() / ref.norm()), ((e.double() - ref).norm() / ref.norm())
        assert err <= 2 * eager_err + 1e-3, (err, eager_err)


def _ids(packs):
    return [id(p) for p in packs.values()]


def test_packed_weight_reused_under_inference_mode_and_rebuilt_after_in_place_writes():
    if not stage_ops.onednn_fused_available():
        pytest.skip("this torch does not expose oneDNN's fused convolution")
    model, fused = (m.to(memory_format=torch.channels_last) for m in _pair(torch.float32))
    conv = fused.get_submodule("block.conv1")
    assert isinstance(conv, FusedConv2d)
    ref_conv, ref_bn = model.block.conv1, model.block.bn1
    x = torch.randn(2, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        fused(x)
        packs = conv._fold.packs()
        assert packs and all(p.is_mkldnn for p in packs.values())
        fused(x)
        assert _ids(conv._fold.packs()) == _ids(packs)  # reused: nothing repacked
    for write in (lambda c, b: b.running_var.mul_(3.0), lambda c, b: b.running_mean.add_(0.5),
                  lambda c, b: c.weight.mul_(-0.5), lambda c, b: b.weight.add_(1.0)):
        with torch.no_grad():
            write(ref_conv, ref_bn)
            write(conv, conv.bn)
        with torch.inference_mode():
            got, expected = fused(x), model(x)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())
        assert not set(_ids(conv._fold.packs())) & set(_ids(packs))  # all rebuilt
        packs = conv._fold.packs()


class FlattensWithView(nn.Module):
    """Code that needs NCHW tensors: ``view`` on a feature map fails on channels_last."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()
        self.fc = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        y = self.relu(self.bn(self.conv(x)))
        return self.fc(y.view(y.shape[0], -1))


def test_model_code_that_needs_nchw_runs_in_the_callers_layout():
    torch.manual_seed(0)
    model = randomize_bn(FlattensWithView()).eval()
    fused = neptune_ext.fuse_stages(model)
    x = torch.randn(2, 3, 6, 6)
    with torch.inference_mode():
        expected = model(x)
        for _ in range(2):
            torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)
    assert "caller" in fused.fusion_layout
    with pytest.raises(RuntimeError):  # the caller's own errors still come through
        fused(torch.randn(2, 3, 5, 5))


def test_copies_keep_the_layout_guard():
    import copy
    import io
    model, fused = _pair(torch.float32)
    x = torch.randn(1, 3, 12, 12)
    with torch.inference_mode():
        expected = fused(x)
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(fused), torch.load(buf, weights_only=False)):
        assert clone.forward.module is clone
        with torch.inference_mode():
            for g, e in zip(clone(x), expected):
                torch.testing.assert_close(g, e)
                _same_format(g, e)


def test_eval_replay_follows_mode_layout_and_shape_changes():
    """The second call of a kind replays the first's oneDNN call; any change of the kind of
    call (layout, batch, train mode, autograd) takes the full path again."""
    model, fused = _pair(torch.float32)
    x = torch.randn(2, 3, 12, 12)
    for inp in (x, x.contiguous(memory_format=torch.channels_last), x[:1], x, x[:1]):
        with torch.inference_mode():
            for _ in range(2):
                for g, e in zip(fused(inp), model(inp)):
                    torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
                    _same_format(g, e)
    fused.train(), model.train()
    with torch.no_grad():  # batch statistics: never the eval replay
        for g, e in zip(fused(x), model(x)):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    fused.eval(), model.eval()
    xg = x.clone().requires_grad_()
    out = fused(xg)[1]
    assert out.requires_grad
    torch.testing.assert_close(out, model(x)[1], rtol=1e-5, atol=1e-5)


class NormalizesInPlaceThenFlattens(FlattensWithView):
    def forward(self, x):
        x.sub_(0.5)  # into the caller's tensor, before the code that needs NCHW
        return super().forward(x)


@pytest.mark.parametrize("inference", [False, True])
def test_the_nchw_rerun_undoes_writes_into_the_callers_input(inference):
    torch.manual_seed(0)
    model = randomize_bn(NormalizesInPlaceThenFlattens()).eval()
    fused = neptune_ext.fuse_stages(model)
    x = torch.randn(2, 3, 6, 6)
    with torch.inference_mode() if inference else torch.no_grad():
        x_model, x_fused = x.clone(), x.clone()  # (inference tensors when inference)
        expected = model(x_model)
        torch.testing.assert_close(fused(x_fused), expected, rtol=1e-5, atol=1e-5)
    assert "caller" in fused.fusion_layout
    torch.testing.assert_close(x_fused, x_model)  # written once, as the unfused model does


def test_vmap_over_stacked_parameters_of_a_fused_model():
    from torch.func import functional_call, stack_module_state, vmap
    torch.manual_seed(0)
    models = [neptune_ext.fuse_stages(randomize_bn(FlattensWithView()).eval()) for _ in range(2)]
    params, buffers = stack_module_state(models)
    x = torch.randn(2, 3, 6, 6)
    out = vmap(lambda p, b, xx: functional_call(models[0], (p, b), (xx,)), in_dims=(0, 0, None))(
        params, buffers, x)
    with torch.no_grad():
        for k, m in enumerate(models):
            torch.testing.assert_close(out[k], m(x), rtol=1e-5, atol=1e-5)


def test_the_layout_guard_copies_inputs_only_until_a_call_has_converted():
    from neptune_app.bench.host import _CountOps as Clones  # counts every dispatched op

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    fused = neptune_ext.fuse_stages(randomize_bn(model).eval())
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        with Clones() as first:
            fused(x)
        with Clones() as second:
            fused(x)
    # the first call keeps its input (one copy) besides converting in and out; later calls
    # only convert
    assert "channels_last" in fused.fusion_layout
    assert first.calls["aten.clone"] == second.calls["aten.clone"] + 1, (first.calls, second.calls)
    fused.train()
    with Clones() as training:
        fused(x)
    assert training.calls["aten.clone"] == 0, training.calls
