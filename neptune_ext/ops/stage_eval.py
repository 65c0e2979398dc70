"""Evaluation Stage: BN folded into the convolution, conv + bias (+ ReLU) in one
oneDNN primitive on prepacked weights where the installed torch exposes it."""
import functools
from typing import Optional

import torch
import torch.nn.functional as F

from .fold_cache import FoldCache, PackCache, _stamps, fold_conv_bn, pack_conv_weight
from .stage_checks import _pair, _validate_conv

__all__ = ["fold_conv_bn", "conv_bn_relu_eval", "conv_bias_relu", "conv_bias", "pack_conv_weight",
           "onednn_fused_available", "stage_paths", "reset_stage_paths"]

# How many evaluation convolutions ran on each path (neptune_ext.info() shows them):
#   onednn-fused   CPU: one oneDNN primitive, conv + bias (+ ReLU post-op)
#   cudnn-fused    CUDA: torch.cudnn_convolution_relu, conv + bias + ReLU in one cuDNN call
#   conv+bias      conv2d with its bias (+ an in-place ReLU): every other case
#   autograd       under autograd (differentiable fold, conv2d, out-of-place ReLU)
_PATHS = {}


def _count(path: str) -> None:
    _PATHS[path] = _PATHS.get(path, 0) + 1


def stage_paths() -> dict:
    """{path: calls} of the evaluation convolutions run so far in this process."""
    return dict(_PATHS)


def reset_stage_paths() -> None:
    _PATHS.clear()


# cuDNN's fused conv + bias + ReLU, per (dtype, memory format): None = not tried yet,
# False = cuDNN refused it once (that combination then takes conv2d + relu_).
_CUDNN_OK = {}


def _cudnn_conv_relu(input, weight, bias, s, p, d, groups):
    key = (input.dtype, input.is_contiguous())
    if not (torch.backends.cudnn.enabled and _CUDNN_OK.get(key, True)
            and hasattr(torch, "cudnn_convolution_relu")):
        return None
    try:  # (cuDNN picks the memory format as conv2d does: channels_last if either is)
        out = torch.cudnn_convolution_relu(input, weight, bias, list(s), list(p), list(d), groups)
    except RuntimeError:
        _CUDNN_OK[key] = False
        return None
    _CUDNN_OK[key] = True
    return out


# ----------------------------------------------------------------------------
# Evaluation: folded BN, conv + bias + ReLU

@functools.lru_cache(maxsize=None)
def onednn_fused_available() -> bool:
    """Whether this torch exposes oneDNN's fused convolution + pointwise op and weight
    prepacking (``torch.ops.mkldnn._convolution_pointwise`` / ``_reorder_convolution_weight``)."""
    try:
        return (torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
                and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight"))
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return False


@functools.lru_cache(maxsize=None)
def _onednn_dtypes() -> frozenset:
    dts = {torch.float32}
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            dts.add(torch.bfloat16)
    except Exception:  # noqa: BLE001
        pass
    return frozenset(dts)


def _onednn_eligible(input: torch.Tensor) -> bool:
    """oneDNN's fused path runs for CPU float32 (bf16 where supported) channels_last
    input outside autograd. For NCHW input its output would come back channels_last
    (a layout change a drop-in layer must not make), so NCHW takes conv + relu_."""
    if not (input.device.type == "cpu" and torch.backends.mkldnn.enabled and onednn_fused_available()):
        return False
    return (input.dtype in _onednn_dtypes() and not input.is_contiguous()
            and input.is_contiguous(memory_format=torch.channels_last))


def _conv_bias_act(input, weight, bias, stride, padding, dilation, groups, relu: bool,
                   packed_weight=None):
    s, p, d = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    grad = torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad
                                        or bias.requires_grad)
    if not grad and _onednn_eligible(input):
        w = packed_weight if packed_weight is not None else weight
        _count("onednn-fused")
        return torch.ops.mkldnn._convolution_pointwise(
            input, w, bias, list(p), list(s), list(d), groups, "relu" if relu else "none", [], "")
    if not grad and relu and input.is_cuda:
        out = _cudnn_conv_relu(input, weight, bias, s, p, d, groups)
        if out is not None:
            _count("cudnn-fused")
            return out
    _count("autograd" if grad else "conv+bias")
    out = F.conv2d(input, weight, bias, s, p, d, groups)
    if not relu:
        return out
    # Under autograd an out-of-place clamp (its backward keeps the input, not the
    # output), so a later in-place ReLU on the result stays legal, as in eager.
    return out.clamp_min(0) if grad else out.relu_()


def conv_bias_relu(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride=1,
                   padding=0, dilation=1, groups: int = 1,
                   packed_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``relu(conv2d(input, weight, bias))`` with no separate bias or ReLU pass.

    On the CPU with channels_last float32 input and autograd off, one oneDNN
    primitive with a fused ReLU post-op (on ``packed_weight`` when given, see
    :func:`pack_conv_weight`); otherwise conv2d with bias and an in-place ReLU.
    The output has the memory format eager conv2d would give.
    """
    return _conv_bias_act(input, weight, bias, stride, padding, dilation, groups, True, packed_weight)


def conv_bn_relu_eval(input: torch.Tensor, conv_weight, conv_bias, bn_weight, bn_bias,
                      running_mean, running_var, eps: float, stride=1, padding=0, dilation=1,
                      groups: int = 1, cache: Optional[FoldCache] = None,
                      relu: bool = True) -> torch.Tensor:
    """``relu(batch_norm_eval(conv2d(input, conv_weight, conv_bias)))`` with BN folded
    (without the ReLU when ``relu=False``).

    Under autograd (grad mode on and any input requiring grad) the fold is
    recomputed differentiably on every call; otherwise it comes from ``cache``.
    """
    s, p, d = _validate_conv(input, conv_weight, stride, padding, dilation, groups)
    params = (conv_weight, conv_bias, bn_weight, bn_bias)
    if torch.is_grad_enabled() and (input.requires_grad or any(
            t is not None and t.requires_grad for t in params)):
        w, b = fold_conv_bn(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps)
        _count("autograd")
        out = F.conv2d(input, w, b, s, p, d, groups)
        return out.clamp_min(0) if relu else out
    cache = cache if cache is not None else FoldCache()
    (w, b), cacheable = cache.folded(conv_weight, conv_bias, bn_weight, bn_bias, running_mean,
                                     running_var, eps)
    packed = None
    if cacheable and _onednn_eligible(input):
        packed = cache.packed(w, s, p, d, groups, input)
    return _conv_bias_act(input, w, b, s, p, d, groups, relu, packed)


def conv_bias(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride=1,
              padding=0, dilation=1, groups: int = 1,
              cache: Optional[PackCache] = None) -> torch.Tensor:
    """``conv2d(input, weight, bias)``; for channels_last float32 CPU input outside
    autograd, one oneDNN primitive on a weight prepacked once (in ``cache``)."""
    s, p, d = _validate_conv(input, weight, stride, padding, dilation, groups)
    if bias is None:
        _count("conv+bias")
        return F.conv2d(input, weight, None, s, p, d, groups)
    packed = None
    grad = torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad
                                        or bias.requires_grad)
    if cache is not None and not grad and _onednn_eligible(input) and _stamps((weight,)) is not None:
        packed = cache.packed(weight, s, p, d, groups, input)
    return _conv_bias_act(input, weight, bias, s, p, d, groups, False, packed)
