"""Argument checks of the Stage ops (a ValueError naming the argument)."""
from typing import Tuple

import torch

from .._util import check as _check

def _validate_tensor(name: str, t, device=None):
    _check(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _check(t.is_floating_point(), f"{name} must be a floating-point tensor, got {t.dtype}")
    if device is not None:
        _check(t.device == device, f"{name} is on {t.device} but x is on {device}")


def _validate_bn(x_name: str, x, weight, bias, eps, training: bool = True):
    _validate_tensor(x_name, x)
    _check(x.dim() == 4, f"{x_name} must have shape [N, C, H, W], got {list(x.shape)}")
    C = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        _validate_tensor(name, t, x.device)
        _check(t.shape == (C,), f"{name} must have shape [C] = [{C}], got {list(t.shape)}")
    _check(isinstance(eps, (int, float)) and eps > 0, f"eps must be a positive float, got {eps!r}")
    if training:
        _check(x.numel() // max(C, 1) > 1,
               f"Expected more than 1 value per channel when training, got {x_name} size "
               f"{list(x.shape)}")


def _pair(v, name: str) -> Tuple[int, int]:
    if type(v) is tuple and len(v) == 2 and type(v[0]) is int and type(v[1]) is int:
        return v  # (what modules hold: the common case, checked first)
    if isinstance(v, int):
        return (v, v)
    _check(isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v),
           f"{name} must be an int or a pair of ints, got {v!r}")
    return tuple(v)


def _validate_conv(input, conv_weight, stride, padding, dilation, groups, weight_dtype=None):
    """Checks of a convolution's arguments; ``weight_dtype``: the dtype the weight is used in
    (default: its own)."""
    _validate_tensor("input", input)
    _check(input.dim() == 4, f"input must have shape [N, C_in, H, W], got {list(input.shape)}")
    _validate_tensor("conv_weight", conv_weight, input.device)
    _check(conv_weight.dim() == 4, f"conv_weight must have shape [C_out, C_in / groups, kH, kW], "
           f"got {list(conv_weight.shape)}")
    _check(isinstance(groups, int) and groups > 0, f"groups must be a positive int, got {groups!r}")
    _check(input.shape[1] == conv_weight.shape[1] * groups,
           f"input has {input.shape[1]} channels but conv_weight expects C_in = "
           f"{conv_weight.shape[1] * groups} (conv_weight.shape[1] * groups)")
    _check(conv_weight.shape[0] % groups == 0,
           f"conv_weight has {conv_weight.shape[0]} output channels, not divisible by groups = {groups}")
    if weight_dtype is None:
        _check(input.dtype == conv_weight.dtype,
               f"input ({input.dtype}) and conv_weight ({conv_weight.dtype}) must share one dtype")
    else:
        _check(input.dtype == weight_dtype,
               f"input ({input.dtype}) must have the compute dtype {weight_dtype}")
    s, p, d = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    _check(all(v > 0 for v in s), f"stride must be positive, got {stride!r}")
    _check(all(v >= 0 for v in p), f"padding must be non-negative, got {padding!r}")
    _check(all(v > 0 for v in d), f"dilation must be positive, got {dilation!r}")
    for i, name in ((2, "height"), (3, "width")):
        k_eff = d[i - 2] * (conv_weight.shape[i] - 1) + 1
        _check(input.shape[i] + 2 * p[i - 2] >= k_eff,
               f"input {name} {input.shape[i]} (+ padding) is smaller than the effective kernel "
               f"size {k_eff}")
    return s, p, d


def conv_output_shape(input: torch.Tensor, weight: torch.Tensor, s, p, d):
    """[N, C_out, H_out, W_out] of conv2d(input, weight) with stride s, padding p, dilation d."""
    hw = [(input.shape[i] + 2 * p[i - 2] - d[i - 2] * (weight.shape[i] - 1) - 1) // s[i - 2] + 1
          for i in (2, 3)]
    return [input.shape[0], weight.shape[0]] + hw
