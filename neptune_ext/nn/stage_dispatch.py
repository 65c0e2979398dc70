"""Which path a Stage call takes, and the calls themselves: autocast, the folded eval
convolution, the fused BN+ReLU training kernel, the recomputing training Function, or eager.
:func:`_stage_forward` returns the output and the name of the path that computed it; the
modules (nn/stage.py) keep that name on themselves (``neptune_ext.stage_paths`` reports
them per model)."""
from typing import Optional, Tuple

import torch
from torch import nn

from .._util import is_compiling
from ..ops import stage as ops
from ..ops.stage_eval import conv_bn_act_eval_with_path
from ..ops.stage_eval_paths import EVAL_PATH_TALLY, EVAL_PATHS

Result = Tuple[torch.Tensor, Optional[str]]  # (output, the name of the path that computed it)

def _autocast_on(t: torch.Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(t.device.type)
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled() if t.device.type == "cpu" else torch.is_autocast_enabled()


def _batch_statistics(bn: nn.BatchNorm2d) -> bool:
    """Whether ``bn`` normalizes with the batch's statistics (as nn.BatchNorm2d decides)."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _autocast_dtype(device_type: str) -> torch.dtype:
    try:
        return torch.get_autocast_dtype(device_type)
    except AttributeError:  # torch < 2.4
        return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()


def _autocast_fused(conv: nn.Conv2d, bn: nn.BatchNorm2d, input: torch.Tensor, memory_efficient: bool,
                    cache, activation: str, residual: Optional[torch.Tensor]) -> Optional[Result]:
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
    bn_training = _batch_statistics(bn)
    if bn_training:
        if activation not in ("relu", "relu6", "none"):
            return None
        with torch.autocast(device, enabled=False):
            # (casts autograd differentiates: gradients reach the float32 weight as in eager)
            x, w = input.to(dtype), conv.weight.to(dtype)
            if activation == "relu" and residual is None:
                return _train_bn_relu(conv, bn, x, w, memory_efficient)
            # (None where eager must run: under autocast, with the float32 input)
            return _train_other(conv, bn, x, w, memory_efficient, activation, residual)
    params = (input, residual, conv.weight, conv.bias, bn.weight, bn.bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params):
        return None
    with torch.autocast(device, enabled=False):
        return conv_bn_act_eval_with_path(
            input.to(dtype), conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
            bn.running_var, bn.eps, conv.stride, conv.padding, conv.dilation, conv.groups,
            cache=cache, activation=activation, residual=residual, dtype=dtype)


def _eager(conv: nn.Conv2d, bn: nn.BatchNorm2d, input: torch.Tensor, activation: str,
           residual: Optional[torch.Tensor] = None) -> Result:
    """What the eager modules compute: activation(bn(conv(input)) (+ residual)). Used where
    their rules are the reference (autocast with autograd in eval, parameters autocast does
    not cast) or no fused path exists (batch statistics with SiLU/Hardswish, a broadcasting
    residual, ``memory_efficient=False`` with anything but ReLU)."""
    y = nn.BatchNorm2d.forward(bn, nn.Conv2d.forward(conv, input))
    if residual is None:
        # Out of place: a model may reapply a shared in-place ReLU to the result.
        return ops.apply_activation(y, activation, inplace=False), "eager"
    # The sum is a fresh tensor: activate it in place, as the residual blocks' own
    # ReLU(inplace=True) does (autograd keeps one tensor, not two).
    return ops.apply_activation(y + residual, activation,
                                inplace=activation in ("relu", "relu6")), "eager"


def _stage_forward(conv: nn.Conv2d, bn: nn.BatchNorm2d, input: torch.Tensor,
                   memory_efficient: bool, cache, activation: str = "relu",
                   residual: Optional[torch.Tensor] = None) -> Result:
    """activation(bn(conv(input)) (+ residual)) exactly as the eager modules compute it, in
    the BN's mode, and the name of the path that computed it (None under torch.compile:
    nothing is recorded there). An evaluation convolution's path is added to the
    process-wide tally (``neptune_ext.ops.stage_eval_paths``)."""
    if is_compiling():
        return _stage_forward_impl(conv, bn, input, memory_efficient, cache, activation, residual)[0], None
    result = None
    if getattr(cache, "plan", None) is not None and not _batch_statistics(bn) and (
            isinstance(input, torch.Tensor) and not _autocast_on(input)):
        result = ops.replay_eval(cache, input, conv.weight, conv.bias, bn.weight, bn.bias,
                                 bn.running_mean, bn.running_var, bn.eps, conv.stride, conv.padding,
                                 conv.dilation, conv.groups, activation, residual)
    if result is None:
        result = _stage_forward_impl(conv, bn, input, memory_efficient, cache, activation, residual)
    if result[1] in EVAL_PATHS:
        EVAL_PATH_TALLY.add(result[1])
    return result


def _stage_forward_impl(conv: nn.Conv2d, bn: nn.BatchNorm2d, input: torch.Tensor,
                        memory_efficient: bool, cache, activation: str,
                        residual: Optional[torch.Tensor]) -> Result:
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise ValueError(f"residual must be a torch.Tensor or None, got {type(residual).__name__}")
        if isinstance(input, torch.Tensor) and residual.device != input.device:
            raise ValueError(f"residual is on {residual.device} but input is on {input.device}")
    autocast = isinstance(input, torch.Tensor) and _autocast_on(input)
    _check_input(input, conv, check_dtype=not autocast)
    if residual is not None:
        _check_residual_shape(residual, input, conv)
    if autocast:
        result = _autocast_fused(conv, bn, input, memory_efficient, cache, activation, residual)
        return _eager(conv, bn, input, activation, residual) if result is None else result
    bn_training = _batch_statistics(bn)
    if not bn_training:
        return conv_bn_act_eval_with_path(
            input, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
            bn.eps, conv.stride, conv.padding, conv.dilation, conv.groups, cache=cache,
            activation=activation, residual=residual)
    if activation != "relu" or residual is not None:
        result = _train_other(conv, bn, input, conv.weight, memory_efficient, activation, residual)
        return _eager(conv, bn, input, activation, residual) if result is None else result
    return _train_bn_relu(conv, bn, input, conv.weight, memory_efficient)


def _train_other(conv: nn.Conv2d, bn: nn.BatchNorm2d, input: torch.Tensor, weight: torch.Tensor,
                 memory_efficient: bool, activation: str, residual: Optional[torch.Tensor]
                 ) -> Optional[Result]:
    """Batch statistics with ReLU6 / no activation / a residual add: the recomputing
    conv_bn_act_train where it applies (ReLU, ReLU6 or none; a residual of the output's
    shape), else None: the caller runs the eager modules' computation (with the caller's
    input: under autocast ``input`` and ``weight`` here are autocast's casts)."""
    s, p, d = conv.stride, conv.padding, conv.dilation
    if (not memory_efficient or activation not in ("relu", "relu6", "none") or (
            residual is not None and list(residual.shape) != ops.conv_output_shape(input, weight, s, p, d))):
        return None  # (a broadcasting add, SiLU, ...)

    def run(bn_w, bn_b):
        return ops.conv_bn_act_train(input, weight, bn_w, bn_b, residual, s, p, d, conv.groups,
                                     bn.eps, activation, conv_bias=conv.bias)
    return _with_running_stats(conv, bn, run), "conv-bn-recompute"


def _train_bn_relu(conv: nn.Conv2d, bn: nn.BatchNorm2d, input: torch.Tensor,
                   weight: torch.Tensor, memory_efficient: bool) -> Result:
    """relu(bn(conv(input))) with batch statistics (conv with ``weight``: conv.weight or its
    autocast copy), the running statistics updated as nn.BatchNorm2d.forward does."""

    def run(bn_w, bn_b):
        if bn_w is None:  # affine=False
            bn_w = torch.ones(bn.num_features, dtype=conv.weight.dtype, device=input.device)
        if bn_b is None:
            bn_b = torch.zeros(bn.num_features, dtype=conv.weight.dtype, device=input.device)
        return ops.conv_bn_relu_train(input, weight, bn_w, bn_b, conv.stride, conv.padding,
                                      conv.dilation, conv.groups, bn.eps, recompute=memory_efficient,
                                      conv_bias=conv.bias)
    return _with_running_stats(conv, bn, run), "bn-relu-kernel"


def _with_running_stats(conv: nn.Conv2d, bn: nn.BatchNorm2d, run) -> torch.Tensor:
    """``run(bn.weight, bn.bias) -> (y, mean, var)``, then the running statistics updated as
    nn.BatchNorm2d.forward updates them."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    y, mean, var = run(bn.weight, bn.bias)
    if not bn.training or bn.track_running_stats:
        if conv.bias is not None:  # cancels in the output, not in the running mean
            mean = mean + conv.bias.detach()
        ops.update_running_stats(bn.running_mean, bn.running_var, mean, var,
                                 y.numel() // y.shape[1], factor)
    return y


def _check_input(input, conv: nn.Conv2d, check_dtype: bool = True):
    if not isinstance(input, torch.Tensor):
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
    shape = ops.conv_output_shape(input, conv.weight, conv.stride, conv.padding, conv.dilation)
    if list(residual.shape) == shape:
        return  # (the common case: a residual of the output's shape)
    try:
        ok = list(torch.broadcast_shapes(tuple(residual.shape), tuple(shape))) == list(shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"residual must have the output's shape [N, C_out, H_out, W_out] = "
                         f"{list(shape)} (or broadcast to it), got {list(residual.shape)}")


def _bn_with_shifted_mean(bn: nn.BatchNorm2d, shift: torch.Tensor) -> nn.BatchNorm2d:
    """A BatchNorm2d sharing bn's affine parameters, with copies of its buffers and
    running_mean - shift."""
    new = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, affine=False,
                         track_running_stats=False)
    new.affine, new.track_running_stats = bn.affine, bn.track_running_stats
    new.weight, new.bias = bn.weight, bn.bias
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        buf = getattr(bn, name)
        new.register_buffer(name, None if buf is None else buf.detach().clone())
    if new.running_mean is not None:
        with torch.no_grad():
            new.running_mean.sub_(shift.to(new.running_mean.dtype))
    new.train(bn.training)
    return new
