"""Which path a Stage call takes: under autocast the autocast policy (autocast.py), in
eval the folded convolution (stage/eval.py, or a replay of its previous oneDNN call),
with batch statistics the fused training ops (batch_stats.py), and where none of those
applies the eager modules' computation. :func:`stage_forward` returns the output and the
name of the path that computed it; the modules (stage/module.py) keep that name on themselves
(``neptune_ext.stage_paths`` reports them per model)."""
from typing import Optional

import torch
from torch import nn

from .._util import is_compiling, is_exporting
from .activations import apply_activation
from .checks import conv_output_shape
from .eval import conv_bn_act_eval_with_path, replay_eval
from .paths import EVAL_PATH_TALLY, EVAL_PATHS, PathResult
from .autocast import autocast_fused, autocast_on
from .batch_stats import batch_statistics, train_bn_relu, train_other

__all__ = ["stage_forward"]


def stage_forward(conv: nn.Conv2d, bn: nn.BatchNorm2d, input: torch.Tensor,
                  memory_efficient: bool, cache, activation: str = "relu",
                  residual: Optional[torch.Tensor] = None) -> PathResult:
    """activation(bn(conv(input)) (+ residual)) exactly as the eager modules compute it, in
    the BN's mode, and the name of the path that computed it (None under torch.compile:
    nothing is recorded there). An evaluation convolution's path is added to the
    process-wide tally (``neptune_ext.stage.paths``)."""
    if is_compiling():
        return _stage_forward_impl(conv, bn, input, memory_efficient, cache, activation, residual)[0], None
    result = None
    if getattr(cache, "plan", None) is not None and not batch_statistics(bn) and (
            isinstance(input, torch.Tensor) and not autocast_on(input)):
        result = replay_eval(cache, input, conv.weight, conv.bias, bn.weight, bn.bias,
                             bn.running_mean, bn.running_var, bn.eps, conv.stride, conv.padding,
                             conv.dilation, conv.groups, activation, residual)
    if result is None:
        result = _stage_forward_impl(conv, bn, input, memory_efficient, cache, activation, residual)
    if result[1] in EVAL_PATHS:
        EVAL_PATH_TALLY.add(result[1])
    return result


def _stage_forward_impl(conv: nn.Conv2d, bn: nn.BatchNorm2d, input: torch.Tensor,
                        memory_efficient: bool, cache, activation: str,
                        residual: Optional[torch.Tensor]) -> PathResult:
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise ValueError(f"residual must be a torch.Tensor or None, got {type(residual).__name__}")
        if isinstance(input, torch.Tensor) and residual.device != input.device:
            raise ValueError(f"residual is on {residual.device} but input is on {input.device}")
    autocast = isinstance(input, torch.Tensor) and autocast_on(input)
    _check_input(input, conv, check_dtype=not autocast)
    if residual is not None:
        _check_residual_shape(residual, input, conv)
    if batch_statistics(bn) and (input.numel() == 0 or is_exporting()):
        # An empty training batch (under autocast too): what the eager modules do with it (an
        # empty output, the BN's batch counter stepped, running statistics unchanged). Under
        # torch.export, the eager modules' graph (aten batch_norm), which the exported program
        # and its runtimes know: the fused ops update the running statistics under no_grad,
        # which export records as a region that torch.export.save refuses.
        return _eager(conv, bn, input, activation, residual)
    if autocast:
        result = autocast_fused(conv, bn, input, memory_efficient, cache, activation, residual)
        return _eager(conv, bn, input, activation, residual) if result is None else result
    bn_training = batch_statistics(bn)
    if not bn_training:
        return conv_bn_act_eval_with_path(
            input, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
            bn.eps, conv.stride, conv.padding, conv.dilation, conv.groups, cache=cache,
            activation=activation, residual=residual)
    if activation != "relu" or residual is not None:
        result = train_other(conv, bn, input, conv.weight, memory_efficient, activation, residual)
        return _eager(conv, bn, input, activation, residual) if result is None else result
    return train_bn_relu(conv, bn, input, conv.weight, memory_efficient)


def _eager(conv: nn.Conv2d, bn: nn.BatchNorm2d, input: torch.Tensor, activation: str,
           residual: Optional[torch.Tensor] = None) -> PathResult:
    """What the eager modules compute: activation(bn(conv(input)) (+ residual)). Used where
    their rules are the reference (autocast with autograd in eval, parameters autocast does
    not cast) or no fused path exists (batch statistics with SiLU/Hardswish, a broadcasting
    residual, ``memory_efficient=False`` with anything but ReLU)."""
    y = nn.BatchNorm2d.forward(bn, nn.Conv2d.forward(conv, input))
    if residual is None:
        # Out of place: a model may reapply a shared in-place ReLU to the result.
        return apply_activation(y, activation, inplace=False), "eager"
    # The sum is a fresh tensor: activate it in place, as the residual blocks' own
    # ReLU(inplace=True) does (autograd keeps one tensor, not two).
    return apply_activation(y + residual, activation,
                            inplace=activation in ("relu", "relu6")), "eager"


def _check_input(input, conv: nn.Conv2d, check_dtype: bool = True):
    if not isinstance(input, torch.Tensor):
        if isinstance(input, torch.fx.Proxy):  # torch.fx.symbolic_trace of a fused model
            raise RuntimeError("fuse_stages: a fused Stage cannot be traced with torch.fx; use "
                               "torch.compile, or trace the model before fuse_stages")
        raise ValueError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"input must have shape [N, C, H, W], got {list(input.shape)}")
    if input.shape[1] != conv.in_channels:
        raise ValueError(f"input has {input.shape[1]} channels but the Stage has "
                         f"in_channels = {conv.in_channels}")
    if check_dtype and input.dtype != conv.weight.dtype:
        raise ValueError(f"input dtype {input.dtype} does not match the Stage's parameters "
                         f"({conv.weight.dtype})")
    if input.device != conv.weight.device:
        raise ValueError(f"input is on {input.device} but the Stage's parameters are on "
                         f"{conv.weight.device}")


def _check_residual_shape(residual: torch.Tensor, input: torch.Tensor, conv: nn.Conv2d):
    """The residual is added to the output: it must have the output's shape or broadcast to
    it (a residual that would grow the output is refused too)."""
    shape = conv_output_shape(input, conv.weight, conv.stride, conv.padding, conv.dilation)
    if list(residual.shape) == shape:
        return  # (the common case: a residual of the output's shape)
    try:
        ok = list(torch.broadcast_shapes(tuple(residual.shape), tuple(shape))) == list(shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"residual must have the output's shape [N, C_out, H_out, W_out] = "
                         f"{list(shape)} (or broadcast to it), got {list(residual.shape)}")
