"""Pure-PyTorch references for the Stage ops: the test oracle and the fallback.

Written for clarity, not speed. They follow the kernels' contracts exactly
(neptune::bn_relu_forward / bn_relu_backward, see csrc/stage/stage.h):

    forward:   mean, var = batch mean and biased variance of x over (N, H, W)
               invstd    = 1 / sqrt(var + eps)
               z         = weight * (x - mean) * invstd + bias
               y         = relu(z)
    backward:  dz          = grad_y * [z > 0]
               grad_bias   = sum dz
               grad_weight = sum dz * x_hat,                x_hat = (x - mean) * invstd
               grad_x      = weight * invstd * (dz - mean(dz) - x_hat * mean(dz * x_hat))

Note that grad_x is non-zero where y = 0 (its last two terms), and there x_hat
cannot be recovered from y: the backward needs x (the kernels' callers recompute
it from the convolution instead of storing it).
"""
from typing import Tuple

import torch

from .._util import acc_dtype as _acc_dtype

_DIMS = (0, 2, 3)


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


def bn_relu_forward_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                              eps: float) -> Tuple[torch.Tensor, ...]:
    """(y, mean, var, invstd); differentiable through y by plain autograd."""
    acc = _acc_dtype(x.dtype)
    xa = x.to(acc)
    mean = xa.mean(dim=_DIMS)
    var = (xa - _per_channel(mean)).square().mean(dim=_DIMS)
    invstd = torch.rsqrt(var + eps)
    scale = weight.to(acc) * invstd
    shift = bias.to(acc) - mean * scale
    y = torch.relu(xa * _per_channel(scale) + _per_channel(shift)).to(x.dtype)
    return y, mean.detach(), var.detach(), invstd.detach()


def bn_relu_backward_reference(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                               bias: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bias) of bn_relu_forward, by the closed form."""
    acc = _acc_dtype(x.dtype)
    xa, g = x.to(acc), grad_y.to(acc)
    w, b, mu, r = (t.to(acc) for t in (weight, bias, mean, invstd))
    scale = w * r
    z = xa * _per_channel(scale) + _per_channel(b - mu * scale)
    dz = torch.where(z > 0, g, torch.zeros((), dtype=acc))
    xmu = xa - _per_channel(mu)
    count = x.numel() // x.shape[1]
    sum_dz = dz.sum(dim=_DIMS)
    sum_dz_xmu = (dz * xmu).sum(dim=_DIMS)
    grad_x = _per_channel(scale) * (dz - _per_channel(sum_dz / count)
                                     - xmu * _per_channel(sum_dz_xmu * r * r / count))
    return (grad_x.to(x.dtype), (sum_dz_xmu * r).to(weight.dtype), sum_dz.to(bias.dtype))
