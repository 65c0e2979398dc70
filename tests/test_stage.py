"""The Stage layer (Conv2d -> BatchNorm2d -> ReLU) against nn.Sequential(conv, bn, relu)."""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

from neptune_ext import ops
from neptune_ext.nn import Stage
from neptune_ext.stage import functional as stage_ops

from stage_helpers import F64, layout


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
        (packed,) = stage._fold.packs().values()
        assert packed.is_mkldnn
        torch.testing.assert_close(y, eager(x), rtol=1e-5, atol=1e-5)
        stage(x)
        assert list(stage._fold.packs().values()) == [packed]  # reused, not repacked
        stage(x[:1])  # another input shape: packed for it too, the first one kept
        assert len(stage._fold.packs()) == 2 and packed in stage._fold.packs().values()


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


from neptune_app.bench.stage import randomize_bn, saved_bytes  # noqa: E402  (shared with the benchmark)


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


# ----------------------------------------------------------------------------
# The eval fold cache

def _stage_pair():
    torch.manual_seed(0)
    stage = Stage(3, 4, 3, padding=1).double().eval()
    with torch.no_grad():
        stage.bn.running_mean.normal_()
        stage.bn.running_var.uniform_(0.5, 2)
    return stage


def test_stage_fold_cache_follows_in_place_writes_and_can_be_cleared_or_disabled():
    stage = _stage_pair()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)

    def eager():
        return torch.relu(stage.bn(stage.conv(x)))

    with torch.no_grad():
        stage(x)
        stage.conv.weight.mul_(2)                 # seen by the version counter
        torch.testing.assert_close(stage(x), eager(), rtol=1e-12, atol=1e-12)
        stage.load_state_dict({k: v * 1.5 if v.is_floating_point() else v
                               for k, v in stage.state_dict().items()})
        torch.testing.assert_close(stage(x), eager(), rtol=1e-12, atol=1e-12)
        stage.conv.weight.data.mul_(2)            # not seen (documented): clear_cache()
        stage.clear_cache()
        torch.testing.assert_close(stage(x), eager(), rtol=1e-12, atol=1e-12)
        stage.cache_fold = False                  # or no cache at all
        stage.conv.weight.data.mul_(0.5)
        torch.testing.assert_close(stage(x), eager(), rtol=1e-12, atol=1e-12)


def test_padding_same_with_stride_is_refused_like_conv2d():
    with pytest.raises(ValueError, match="strided"):
        torch.nn.Conv2d(3, 8, 3, padding="same", stride=2)
    with pytest.raises(ValueError, match="padding='same' is not supported for strided"):
        Stage(3, 8, 3, padding="same", stride=2)
    Stage(3, 8, 3, padding="same", stride=1)


# ----------------------------------------------------------------------------
# Autocast: the Stage behaves as the eager Conv-BN-ReLU does under autocast

@pytest.mark.parametrize("train", [True, False])
def test_stage_under_cpu_autocast_matches_eager(train):
    """Under autocast, training runs the conv in bfloat16 and the fused BN+ReLU kernel on
    it (float32 statistics): eager's output dtype and running statistics, values within
    bfloat16 rounding, gradients in float32 close to eager's. Eval with autograd on runs
    eager's own computation (bit-equal)."""
    torch.manual_seed(0)
    stage = Stage(3, 8, 3, padding=1).train(train)
    with torch.no_grad():
        stage.bn.running_mean.normal_()
        stage.bn.running_var.uniform_(0.5, 2)
    eager = nn.Sequential(copy.deepcopy(stage.conv), copy.deepcopy(stage.bn), nn.ReLU()).train(train)
    x = torch.randn(2, 3, 9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = stage(x), eager(x)
    assert got.dtype == want.dtype == torch.bfloat16
    assert stage.bn.running_mean.dtype == torch.float32
    if not train:
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        return
    # one bfloat16 rounding of the output apart (2**-8 relative), at most
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=2 ** -7)
    torch.testing.assert_close(stage.bn.running_mean, eager[1].running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stage.bn.running_var, eager[1].running_var, rtol=1e-5, atol=1e-6)
    g = torch.randn(got.shape)
    got.float().backward(g), want.float().backward(g)
    for a, b in ((stage.conv.weight, eager[0].weight), (stage.bn.weight, eager[1].weight),
                 (stage.bn.bias, eager[1].bias)):
        assert a.grad.dtype == torch.float32
        assert ((a.grad - b.grad).norm() / b.grad.norm()).item() < 2e-2


def test_stage_stack_under_cpu_autocast_saves_at_most_0_6x_eager():
    torch.manual_seed(0)
    stages = nn.Sequential(*[Stage(16, 16, 3, padding=1) for _ in range(4)]).train()
    eager = nn.Sequential(*[nn.Sequential(copy.deepcopy(s.conv), copy.deepcopy(s.bn), nn.ReLU(inplace=True))
                            for s in stages]).train()
    x = torch.randn(4, 16, 20, 20)

    def under_autocast(m):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return m(x)
        return run
    ours, theirs = saved_bytes(under_autocast(stages)), saved_bytes(under_autocast(eager))
    assert ours <= 0.6 * theirs, (ours, theirs)


def test_fused_resnet_under_cpu_autocast_matches_eager():
    """Eval without autograd under autocast: the BN folded in float32, the fused convolution
    in bfloat16. Same dtype as eager's output, and as close to the float32 model as eager
    under autocast is (both are bfloat16 computations; they round differently)."""
    torchvision = pytest.importorskip("torchvision")
    import neptune_ext
    from neptune_ext.stage.eval import eval_path_counts, reset_eval_path_counts
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    fused = neptune_ext.fuse_stages(model)
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
    for memory_format in (torch.contiguous_format, torch.channels_last):
        m, f = model.to(memory_format=memory_format), fused.to(memory_format=memory_format)
        x = torch.randn(2, 3, 64, 64).contiguous(memory_format=memory_format)
        with torch.no_grad():
            ref = m(x)
            reset_eval_path_counts()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                want, got = m(x), f(x)
        assert got.dtype == want.dtype == torch.bfloat16
        assert "autograd" not in eval_path_counts() and sum(eval_path_counts().values()) == 20
        assert rel(got, ref) <= 2 * rel(want, ref) + 5e-3, (rel(got, ref), rel(want, ref))
    # With autograd on (parameters that require grad), eager's own computation: bit-equal.
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)
