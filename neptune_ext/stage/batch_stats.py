"""A Stage call with batch statistics (training mode, or a BN without running statistics):
the fused BN+ReLU kernel, or the recomputing conv_bn_act_train for ReLU6 / no activation /
a residual add, each with the running statistics updated. Each returns ``(output, path)``."""
from typing import Optional

import torch
from torch import nn

from .checks import conv_output_shape
from .paths import PathResult
from .train import conv_bn_act_train, conv_bn_relu_train
from .running_stats import with_running_stats

__all__ = ["batch_statistics", "train_bn_relu", "train_other"]


def batch_statistics(bn: nn.BatchNorm2d) -> bool:
    """Whether ``bn`` normalizes with the batch's statistics (as nn.BatchNorm2d decides)."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def train_other(conv: nn.Conv2d, bn: nn.BatchNorm2d, input: torch.Tensor, weight: torch.Tensor,
                memory_efficient: bool, activation: str, residual: Optional[torch.Tensor]
                ) -> Optional[PathResult]:
    """Batch statistics with ReLU6 / no activation / a residual add: the recomputing
    conv_bn_act_train where it applies (ReLU, ReLU6 or none; a residual of the output's
    shape), else None: the caller runs the eager modules' computation (with the caller's
    input: under autocast ``input`` and ``weight`` here are autocast's casts)."""
    s, p, d = conv.stride, conv.padding, conv.dilation
    if (not memory_efficient or activation not in ("relu", "relu6", "none") or (
            residual is not None and list(residual.shape) != conv_output_shape(input, weight, s, p, d))):
        return None  # (a broadcasting add, SiLU, ...)

    def run(bn_w, bn_b):
        return conv_bn_act_train(input, weight, bn_w, bn_b, residual, s, p, d, conv.groups,
                                 bn.eps, activation, conv_bias=conv.bias)
    return with_running_stats(conv, bn, run), "conv-bn-recompute"


def train_bn_relu(conv: nn.Conv2d, bn: nn.BatchNorm2d, input: torch.Tensor,
                  weight: torch.Tensor, memory_efficient: bool) -> PathResult:
    """relu(bn(conv(input))) with batch statistics (conv with ``weight``: conv.weight or its
    autocast copy), the running statistics updated as nn.BatchNorm2d.forward does."""

    def run(bn_w, bn_b):
        if bn_w is None:  # affine=False
            bn_w = torch.ones(bn.num_features, dtype=conv.weight.dtype, device=input.device)
        if bn_b is None:
            bn_b = torch.zeros(bn.num_features, dtype=conv.weight.dtype, device=input.device)
        return conv_bn_relu_train(input, weight, bn_w, bn_b, conv.stride, conv.padding,
                                  conv.dilation, conv.groups, bn.eps, recompute=memory_efficient,
                                  conv_bias=conv.bias)
    return with_running_stats(conv, bn, run), "bn-relu-kernel"
