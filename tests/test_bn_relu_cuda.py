"""CUDA BatchNorm+ReLU kernels (csrc/stage/stage_cuda.cu) against the float64
reference, the CPU kernel and eager PyTorch. Skipped without a GPU.

The shared semantic tests of tests/test_stage.py also run on cuda (DEVICES); these
add what is specific to the CUDA kernels: every layout and dtype, pieces/tile
boundaries (H*W > 4096, N*H*W > 256 rows, C not a multiple of 32), bitwise
determinism, and opcheck."""
import pytest
import torch
import torch.nn.functional as F

import neptune_ext
from neptune_ext.stage import bn_relu as stage_ops
from neptune_ext.stage.reference import bn_relu_backward_reference, bn_relu_forward_reference

pytestmark = pytest.mark.cuda

# (N, C, H, W): one piece, several NCHW pieces per plane (H*W = 9100 > 4096), many
# NHWC row pieces with C = 33 (a partial 32-channel tile), C = 1, H = W = 1, batch 1.
SHAPES = [(4, 5, 7, 9), (2, 3, 100, 91), (3, 33, 20, 30), (3, 1, 5, 5), (5, 16, 1, 1), (1, 64, 56, 56)]
LAYOUTS = ["nchw", "channels_last", "strided"]
# Tolerances against the float64 reference, relative to the output scale (BN output ~ N(0,1)):
# fp32 ~ a few ulps of the accumulations; fp16/bf16 dominated by the output rounding.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def needs_cuda_kernel():
    if neptune_ext._ext._C is None or not stage_ops._has_stage_kernel("cuda"):
        pytest.skip("no compiled CUDA Stage kernel")


def layout(t, kind):
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "strided":
        return torch.cat([t, t], dim=3)[..., ::2]
    return t.contiguous()


def make(shape, dtype, kind):
    x = layout(torch.randn(shape, device="cuda", dtype=torch.float64).to(dtype) * 3 + 0.5, kind)
    C = shape[1]
    w = torch.randn(C, device="cuda", dtype=torch.float64).to(dtype)
    b = torch.randn(C, device="cuda", dtype=torch.float64).to(dtype)
    return x, w, b


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_forward_backward_vs_f64_reference(shape, kind, dtype):
    needs_cuda_kernel()
    x, w, b = make(shape, dtype, kind)
    y, mean, var, invstd = torch.ops.neptune.bn_relu_forward(x, w, b, 1e-5)
    yr, mr, vr, rr = bn_relu_forward_reference(x.double(), w.double(), b.double(), 1e-5)
    tol = TOL[dtype]
    assert y.dtype == dtype and y.stride() == (x.stride() if kind != "strided" else x.contiguous().stride())
    torch.testing.assert_close(y.double(), yr, rtol=tol, atol=tol)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == acc and var.dtype == acc and invstd.dtype == acc
    stat_tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(mean.double(), mr, rtol=stat_tol, atol=stat_tol)
    torch.testing.assert_close(var.double(), vr, rtol=stat_tol, atol=stat_tol)
    torch.testing.assert_close(invstd.double(), rr, rtol=stat_tol, atol=stat_tol)

    gy = layout(torch.randn(shape, device="cuda", dtype=torch.float64).to(dtype), kind)
    gx, gw, gb = torch.ops.neptune.bn_relu_backward(gy, x, w, b, mean, invstd)
    gxr, gwr, gbr = bn_relu_backward_reference(gy.double(), x.double(), w.double(), b.double(),
                                               mean.double(), invstd.double())
    M = x.numel() // x.shape[1]
    torch.testing.assert_close(gx.double(), gxr, rtol=tol, atol=tol * 4)
    # Sums over M values: scale the tolerance with sqrt(M).
    torch.testing.assert_close(gw.double(), gwr, rtol=tol, atol=tol * M ** 0.5 * 4)
    torch.testing.assert_close(gb.double(), gbr, rtol=tol, atol=tol * M ** 0.5 * 4)


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vs_eager_and_cpu_kernel(kind, dtype):
    needs_cuda_kernel()
    x, w, b = make((8, 64, 28, 28), dtype, kind)
    y = torch.ops.neptune.bn_relu_forward(x, w, b, 1e-5)[0]
    eager = F.relu(F.batch_norm(x, None, None, w, b, True, 0.0, 1e-5))
    err_ours = (y.double() - bn_relu_forward_reference(x.double(), w.double(), b.double(), 1e-5)[0]).abs().max()
    err_eager = (eager.double() - bn_relu_forward_reference(x.double(), w.double(), b.double(), 1e-5)[0]).abs().max()
    # No worse than PyTorch's own error at this precision (plus one output ulp of slack).
    assert err_ours <= 2 * err_eager + TOL[dtype]
    y_cpu = torch.ops.neptune.bn_relu_forward(x.cpu(), w.cpu(), b.cpu(), 1e-5)[0]
    torch.testing.assert_close(y.cpu().double(), y_cpu.double(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_bitwise_deterministic(kind):
    needs_cuda_kernel()
    x, w, b = make((16, 40, 70, 70), torch.float32, kind)
    gy = layout(torch.randn_like(x), kind)
    first = torch.ops.neptune.bn_relu_forward(x, w, b, 1e-5)
    back = torch.ops.neptune.bn_relu_backward(gy, x, w, b, first[1], first[3])
    for _ in range(3):
        again = torch.ops.neptune.bn_relu_forward(x, w, b, 1e-5)
        assert all(torch.equal(a, b_) for a, b_ in zip(first, again))
        back2 = torch.ops.neptune.bn_relu_backward(gy, x, w, b, first[1], first[3])
        assert all(torch.equal(a, b_) for a, b_ in zip(back, back2))


def test_python_dispatch_uses_cuda_kernel():
    needs_cuda_kernel()
    assert stage_ops._use_stage_kernels("cuda")


def test_gradcheck_f64():
    needs_cuda_kernel()
    x, w, b = make((2, 3, 4, 5), torch.float64, "channels_last")
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: stage_ops.bn_relu(*a)[0], (x, w, b))


def test_opcheck():
    needs_cuda_kernel()
    x, w, b = make((2, 8, 6, 6), torch.float32, "channels_last")
    torch.library.opcheck(torch.ops.neptune.bn_relu_forward.default, (x, w, b, 1e-5))
    y, mean, var, invstd = torch.ops.neptune.bn_relu_forward(x, w, b, 1e-5)
    torch.library.opcheck(torch.ops.neptune.bn_relu_backward.default,
                          (torch.randn_like(x), x, w, b, mean, invstd))
