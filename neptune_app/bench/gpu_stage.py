"""GPU benchmark of the training-mode BatchNorm+ReLU CUDA kernels (the Stage ops).

    python benchmarks/gpu_stage.py [--json FILE] [--batch 64]

For the output shape of every Conv-BN-ReLU of ResNet-18 at the given batch, channels_last
and NCHW, fp32 and bf16: forward and backward time (CUDA events, median of repeats after
warm-up) of
  * ours     torch.ops.neptune.bn_relu_forward / bn_relu_backward;
  * eager    F.batch_norm(training=True) + F.relu, and its autograd backward;
and the achieved bandwidth of ours against the bytes it must move (forward: x read
twice + y written; backward: x and grad_y read twice + grad_x written).
The implicit-GEMM convolution of the issue is not implemented yet: no conv here.
"""
import argparse
import json

import torch
import torch.nn.functional as F

import neptune_ext  # noqa: F401  (loads the ops)
from .common import cuda_median_ms, git_commit, write_json

# (C, H, W) of the BN inputs of ResNet-18 (224x224): stem, then the four stages.
RESNET18 = [(64, 112, 112), (64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]


def timeit(fn, reps=20, warm=5):
    """Median seconds (CUDA events)."""
    return cuda_median_ms(fn, warm, reps) * 1e-3


def bench_shape(N, C, H, W, dtype, cl):
    x = torch.randn(N, C, H, W, device="cuda", dtype=dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.rand(C, device="cuda", dtype=dtype) + 0.5
    b = torch.randn(C, device="cuda", dtype=dtype)
    gy = torch.randn_like(x)
    y, mean, var, invstd = torch.ops.neptune.bn_relu_forward(x, w, b, 1e-5)
    t_fwd = timeit(lambda: torch.ops.neptune.bn_relu_forward(x, w, b, 1e-5))
    t_bwd = timeit(lambda: torch.ops.neptune.bn_relu_backward(gy, x, w, b, mean, invstd))
    xe = x.detach().requires_grad_()
    we, be = w.detach().requires_grad_(), b.detach().requires_grad_()
    t_efwd = timeit(lambda: F.relu(F.batch_norm(x, None, None, w, b, True, 0.0, 1e-5)))

    def eager_step():
        out = F.relu(F.batch_norm(xe, None, None, we, be, True, 0.0, 1e-5))
        torch.autograd.grad(out, (xe, we, be), gy)
    t_estep = timeit(eager_step)
    nbytes = x.numel() * x.element_size()
    return {"N": N, "C": C, "H": H, "W": W, "dtype": str(dtype).split(".")[-1],
            "layout": "channels_last" if cl else "nchw",
            "ours_fwd_s": t_fwd, "ours_bwd_s": t_bwd, "eager_fwd_s": t_efwd,
            "eager_fwd_bwd_s": t_estep,
            "ours_fwd_GBps": 3 * nbytes / t_fwd / 1e9, "ours_bwd_GBps": 5 * nbytes / t_bwd / 1e9}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    p.add_argument("--batch", type=int, default=64)
    a = p.parse_args(argv)
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "cuda": torch.version.cuda, "commit": git_commit(), "results": []}
    for dtype in (torch.float32, torch.bfloat16):
        for cl in (True, False):
            for C, H, W in RESNET18:
                r = bench_shape(a.batch, C, H, W, dtype, cl)
                report["results"].append(r)
                print(json.dumps(r), flush=True)
    write_json(a.json, report)


if __name__ == "__main__":
    main()
