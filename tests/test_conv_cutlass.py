"""The CUTLASS convolution with the Stage's epilogue (neptune::conv_bias_act): its entry
refuses what it cannot take with a clear error on every device, and on CUDA (a GPU, a build
with the CUTLASS headers) it computes activation(conv + bias (+ residual)) within eager's
own error against float64, deterministically, for the shapes ResNets use."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neptune_ext
from neptune_ext.stage import eval as stage_eval

needs_op = pytest.mark.skipif(neptune_ext._ext._C is None, reason="extension not built")


@needs_op
def test_the_op_refuses_cpu_tensors_with_a_clear_error():
    x, w, b = torch.randn(1, 8, 5, 5), torch.randn(8, 8, 3, 3), torch.randn(8)
    with pytest.raises(RuntimeError, match="conv_bias_act runs on CUDA devices"):
        torch.ops.neptune.conv_bias_act(x, w, b, None, [1, 1], [1, 1], [1, 1], 1)


def test_eligibility_rules():
    cl = torch.channels_last
    x = torch.randn(2, 16, 6, 6, dtype=torch.bfloat16).contiguous(memory_format=cl)
    w = torch.randn(32, 16, 3, 3, dtype=torch.bfloat16)
    ok = stage_eval._cutlass_eligible
    assert ok(x, w, None, "relu", 1, (1, 1)) and ok(x, w, None, "none", 1, (1, 1))
    assert ok(x, w, torch.empty(0), "relu", 1, (1, 1))
    assert not ok(x, w, torch.empty(0), "none", 1, (1, 1))       # residual only with ReLU
    assert not ok(x, w, None, "silu", 1, (1, 1))
    assert not ok(x.float(), w.float(), None, "relu", 1, (1, 1))   # 16-bit types only
    assert not ok(x.contiguous(), w, None, "relu", 1, (1, 1))     # channels_last only
    assert not ok(x, w, None, "relu", 2, (1, 1)) and not ok(x, w, None, "relu", 1, (2, 2))
    x12 = x[:, :12].contiguous(memory_format=cl)                  # channels_last, 12 channels
    assert not ok(x12, w[:, :12], None, "relu", 1, (1, 1))        # channels % 8
    assert not ok(x, w[:12], None, "relu", 1, (1, 1))             # output channels % 8


def test_off_unless_asked_for(monkeypatch):
    monkeypatch.delenv("NEPTUNE_STAGE_CUTLASS", raising=False)
    assert not stage_eval.cutlass_enabled()


# (C, K, kernel, stride, H, W): ResNet-18/50's convolutions at small sizes, odd sizes.
CASES = [(64, 64, 3, 1, 14, 14), (64, 128, 3, 2, 15, 13), (64, 256, 1, 1, 14, 14),
         (256, 64, 1, 1, 9, 7), (256, 512, 1, 2, 14, 14), (128, 128, 3, 1, 7, 7),
         (16, 8, 3, 1, 5, 5)]


@pytest.mark.cuda
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_cuda_matches_float64_within_eager_error(case, dtype, activation, residual):
    if residual and activation != "relu":
        pytest.skip("a residual goes with ReLU")
    if not stage_eval.cutlass_built():
        pytest.skip("this build has no CUTLASS kernels")
    C, K, k, s, H, W = case
    cl = torch.channels_last
    for batch in (1, 3):
        x = torch.randn(batch, C, H, W, dtype=torch.float64)
        w = torch.randn(K, C, k, k, dtype=torch.float64) / (C * k * k) ** 0.5
        b = torch.randn(K, dtype=torch.float64)
        ref = F.conv2d(x, w, b, s, k // 2)
        r = torch.randn_like(ref) if residual else None
        ref = ref + r if residual else ref
        ref = ref.relu() if activation == "relu" else ref
        xd, wd, bd = (t.cuda().to(dtype) for t in (x, w, b))
        xd = xd.contiguous(memory_format=cl)
        rd = r.cuda().to(dtype).contiguous(memory_format=cl) if residual else None
        out = torch.ops.neptune.conv_bias_act(xd, wd, bd, rd, [s, s], [k // 2, k // 2], [1, 1],
                                              1 if activation == "relu" else 0)
        again = torch.ops.neptune.conv_bias_act(xd, wd, bd, rd, [s, s], [k // 2, k // 2], [1, 1],
                                                1 if activation == "relu" else 0)
        eager = F.conv2d(xd, wd, bd, s, k // 2)
        eager = eager + rd if residual else eager
        eager = eager.relu() if activation == "relu" else eager
        rel = lambda a: ((a.double().cpu() - ref).norm() / ref.norm()).item()  # noqa: E731
        eps = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]
        assert out.shape == ref.shape and out.dtype == dtype
        assert out.is_contiguous(memory_format=cl)
        assert rel(out) <= 4 * rel(eager) + 8 * eps, (rel(out), rel(eager))
        assert torch.equal(out, again)


@pytest.mark.cuda
def test_cuda_entry_checks_its_arguments():
    if not stage_eval.cutlass_built():
        pytest.skip("this build has no CUTLASS kernels")
    cl = torch.channels_last
    x = torch.randn(2, 16, 6, 6, device="cuda", dtype=torch.float16).contiguous(memory_format=cl)
    w = torch.randn(16, 16, 3, 3, device="cuda", dtype=torch.float16)
    b = torch.randn(16, device="cuda", dtype=torch.float16)
    op = torch.ops.neptune.conv_bias_act
    with pytest.raises(RuntimeError, match="channels_last"):
        op(x.contiguous(), w, b, None, [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        op(x.float(), w.float(), b.float(), None, [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="bias must be"):
        op(x, w, b[:8], None, [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="residual must be"):
        op(x, w, b, x[:, :, :4], [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="activation must be"):
        op(x, w, b, None, [1, 1], [1, 1], [1, 1], 3)
    with pytest.raises(RuntimeError, match="CUTLASS cannot run this convolution"):
        op(x[:, :12].contiguous(memory_format=cl), w[:, :12], b, None, [1, 1], [1, 1], [1, 1], 1)


@pytest.mark.cuda
def test_fused_resnet_takes_the_cutlass_path_when_asked(monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    if not stage_eval.cutlass_built():
        pytest.skip("this build has no CUTLASS kernels")
    from neptune_app.bench.stage import randomize_bn
    monkeypatch.setenv("NEPTUNE_STAGE_CUTLASS", "1")
    model = randomize_bn(torchvision.models.resnet18()).cuda().eval().to(memory_format=torch.channels_last)
    fused = neptune_ext.fuse_stages(copy.deepcopy(model)).half()
    x = torch.randn(4, 3, 96, 96, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model.double()(x.double())
        stage_eval.reset_eval_path_counts()
        got = fused(x.half())
        theirs = copy.deepcopy(model).half()(x.half())
    paths = stage_eval.eval_path_counts()
    # every conv but the stem (3 input channels) and its 7x7 takes CUTLASS
    assert paths.get("cutlass-fused", 0) == 19, paths
    rel = lambda a: ((a.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    assert rel(got) <= 2 * rel(theirs) + 8 * 2.0 ** -10
