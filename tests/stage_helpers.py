"""Helpers shared by the BN+ReLU op tests, the Stage layer tests and the fuse_stages tests."""
import pytest
import torch
import torch.nn.functional as F

import neptune_ext
from neptune_ext.stage import bn_relu as bn_relu_ops

F64 = dict(rtol=1e-10, atol=1e-10)
LAYOUTS = ["nchw", "channels_last", "strided"]


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "strided":  # neither NCHW- nor channels_last-contiguous
        return torch.cat([t, t], dim=3)[..., ::2]
    return t.contiguous()


def eager_bn_relu(x, w, b, eps=1e-5):
    return F.relu(F.batch_norm(x, None, None, w, b, True, 0.0, eps))


def needs_ext(device="cpu"):
    if neptune_ext._ext._C is None:
        pytest.skip("extension not built")
    if not bn_relu_ops._has_stage_kernel(torch.device(device).type):
        pytest.skip(f"no compiled Stage kernel for {device} (the reference runs there)")


def fused_double(make, train: bool, seed=0):
    """make() built under torch.manual_seed(seed) (None: no reseed), in float64 with random
    BatchNorm statistics and affine parameters, in train or eval mode; and fuse_stages of
    it: (model, fused)."""
    from neptune_app.bench.stage import randomize_bn  # (shared with the benchmark)
    if seed is not None:
        torch.manual_seed(seed)
    model = randomize_bn(make().double()).train(train)
    return model, neptune_ext.fuse_stages(model)
