"""The autocast policy of a Stage: under ``torch.autocast`` a Stage computes what the eager
Conv-BN-activation computes under autocast (the convolution in autocast's dtype, statistics
and folds in float32), on a fused path where there is one (:func:`autocast_fused`), else the
caller runs the eager modules' computation."""
from typing import Optional

import torch
from torch import nn

from .eval import conv_bn_act_eval_with_path
from .paths import PathResult
from .batch_stats import batch_statistics, train_bn_relu, train_other

__all__ = ["autocast_on", "autocast_fused"]


def autocast_on(t: torch.Tensor) -> bool:
    """Whether autocast is on for ``t``'s device type."""
    try:
        return torch.is_autocast_enabled(t.device.type)
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled() if t.device.type == "cpu" else torch.is_autocast_enabled()


def _autocast_dtype(device_type: str) -> torch.dtype:
    try:
        return torch.get_autocast_dtype(device_type)
    except AttributeError:  # torch < 2.4
        return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()


def autocast_fused(conv: nn.Conv2d, bn: nn.BatchNorm2d, input: torch.Tensor, memory_efficient: bool,
                   cache, activation: str, residual: Optional[torch.Tensor]) -> Optional[PathResult]:
    """The fused paths under autocast, with the convolution in autocast's dtype as autocast
    runs eager's conv (statistics and folds in float32), or None where eager must run.

    - eval without autograd: the BN folded in float32 (cached), one fused convolution;
    - batch statistics with ReLU, ReLU6 or none (and a residual or not): conv in autocast's
      dtype, then the fused BN+ReLU kernel or ATen's BN (float32 parameters and statistics,
      output in autocast's dtype) with the recomputing backward;
    - anything else (or parameters autocast would not cast): None.
    """
    device = input.device.type
    if device not in ("cpu", "cuda") or conv.weight.dtype != torch.float32:
        return None
    dtype = _autocast_dtype(device)
    if input.dtype not in (torch.float32, dtype):
        return None
    bn_training = batch_statistics(bn)
    if bn_training:
        if activation not in ("relu", "relu6", "none"):
            return None
        with torch.autocast(device, enabled=False):
            # (casts autograd differentiates: gradients reach the float32 weight as in eager)
            x, w = input.to(dtype), conv.weight.to(dtype)
            if activation == "relu" and residual is None:
                return train_bn_relu(conv, bn, x, w, memory_efficient)
            # (None where eager must run: under autocast, with the float32 input)
            return train_other(conv, bn, x, w, memory_efficient, activation, residual)
    params = (input, residual, conv.weight, conv.bias, bn.weight, bn.bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params):
        return None
    with torch.autocast(device, enabled=False):
        return conv_bn_act_eval_with_path(
            input.to(dtype), conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
            bn.running_var, bn.eps, conv.stride, conv.padding, conv.dilation, conv.groups,
            cache=cache, activation=activation, residual=residual, dtype=dtype)
