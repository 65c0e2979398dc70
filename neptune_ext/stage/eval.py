"""Evaluation Stage: BN folded into the convolution, conv + bias (+ ReLU) in one
oneDNN primitive on prepacked weights where the installed torch exposes it.

The functions that pick a library call return the path they took with the output
(``*_with_path``; the names are in ``paths.py``); the public ops return the output
and add the path to the process-wide tally (``eval_path_counts``)."""
import threading
from typing import Optional

import torch
import torch.nn.functional as F

from .fold_cache import FoldCache, PackCache, _stamps, fold_conv_bn, pack_conv_weight
from .._util import check as _check, is_compiling as _is_compiling
from .activations import ACTIVATIONS, ONEDNN_UNARY, apply_activation, check_activation
from .capabilities import CUDNN_REFUSED, onednn_dtypes, onednn_fused_available
from .checks import _pair, _validate_conv, conv_output_shape
from .cutlass import cutlass_fused
from .paths import EVAL_PATH_TALLY, PathResult, eval_path_counts, reset_eval_path_counts
# (asked of this module by tests and neptune_app's benchmarks)
from .capabilities import cutlass_built  # noqa: F401
from .cutlass import cutlass_eligible as _cutlass_eligible, cutlass_enabled  # noqa: F401

__all__ = ["fold_conv_bn", "conv_bn_act_eval", "conv_bn_act_eval_with_path", "replay_eval",
           "conv_bias_relu", "conv_bias", "pack_conv_weight", "onednn_fused_available",
           "eval_path_counts", "reset_eval_path_counts", "ACTIVATIONS", "check_activation",
           "apply_activation"]


def _cudnn_fused(input, weight, bias, residual, s, p, d, groups):
    """conv + bias (+ residual) + ReLU as one cuDNN call, or None where cuDNN refuses it."""
    name = "cudnn_convolution_relu" if residual is None else "cudnn_convolution_add_relu"
    # What cuDNN may refuse for one convolution and not another (see LibraryRefusals).
    kind = (name, input.dtype, input.is_contiguous(), groups == 1, tuple(weight.shape[2:]),
            tuple(s), tuple(d))
    if not (torch.backends.cudnn.enabled and not CUDNN_REFUSED.refused(kind) and hasattr(torch, name)):
        return None
    try:  # (cuDNN picks the memory format as conv2d does: channels_last if either is)
        if residual is None:
            out = torch.cudnn_convolution_relu(input, weight, bias, list(s), list(p), list(d), groups)
        else:
            out = torch.cudnn_convolution_add_relu(input, weight, residual, 1.0, bias, list(s),
                                                   list(p), list(d), groups)
    except RuntimeError:  # (that kind then takes conv2d + in-place ops)
        CUDNN_REFUSED.refuse(kind)
        return None
    return out


# ----------------------------------------------------------------------------
# Evaluation: folded BN, conv + bias + ReLU

def _onednn_eligible(input: torch.Tensor) -> bool:
    """oneDNN's fused path runs for CPU float32 (bf16 where supported) channels_last
    input outside autograd. For NCHW input its output would come back channels_last
    (a layout change a drop-in layer must not make), so NCHW takes conv + relu_."""
    if not (input.device.type == "cpu" and torch.backends.mkldnn.enabled and onednn_fused_available()):
        return False
    return (input.dtype in onednn_dtypes() and not input.is_contiguous()
            and input.is_contiguous(memory_format=torch.channels_last))


class _Layout(threading.local):
    """fuse_stages' caller-layout guard (neptune_ext/stage/fuse/layout.py), per thread: while
    ``active`` (a fused model called), an eval convolution given an NCHW tensor runs it in
    channels_last, and ``converted`` says that the guard must restore NCHW outputs."""
    active = False
    converted = False


LAYOUT = _Layout()


def _to_channels_last(input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``input`` in channels_last if the caller-layout guard is active and oneDNN's fused
    path would take it so (an NCHW CPU float32/bfloat16 tensor), else ``input``. (With a
    channels_last ``weight`` eager's conv2d returns channels_last itself: no NCHW to restore.)"""
    if not (LAYOUT.active and input.device.type == "cpu" and input.is_contiguous()
            and not input.is_contiguous(memory_format=torch.channels_last)
            and input.dtype in onednn_dtypes() and torch.backends.mkldnn.enabled
            and onednn_fused_available()):
        return input
    if weight.is_contiguous():
        LAYOUT.converted = True
    return input.contiguous(memory_format=torch.channels_last)


def _residual_fusable(residual: torch.Tensor, input: torch.Tensor, out_shape) -> bool:
    """Whether ``conv_out + residual`` is a plain elementwise add into conv_out (same shape,
    dtype and device: no broadcast, no type promotion)."""
    return (list(residual.shape) == list(out_shape) and residual.dtype == input.dtype
            and residual.device == input.device)


def _conv_bias_act(input, weight, bias, stride, padding, dilation, groups, activation: str,
                   packed_weight=None, residual: Optional[torch.Tensor] = None) -> PathResult:
    """``activation(conv2d(input, weight, bias) (+ residual))`` on the fastest path there is,
    and the name of that path."""
    s, p, d = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    grad = torch.is_grad_enabled() and (
        input.requires_grad or weight.requires_grad or bias.requires_grad
        or (residual is not None and residual.requires_grad))
    fusable = residual is None or _residual_fusable(
        residual, input, conv_output_shape(input, weight, s, p, d))
    if not grad and fusable and _onednn_eligible(input) and (
            residual is None or residual.is_contiguous(memory_format=torch.channels_last)):
        w = packed_weight if packed_weight is not None else weight
        op = torch.ops.mkldnn._convolution_pointwise
        if residual is None:
            unary, scalars = ONEDNN_UNARY[activation]
            return (op(input, w, bias, list(p), list(s), list(d), groups, unary, scalars, ""),
                    "onednn-fused")
        # After an add oneDNN fuses only a ReLU: other activations follow in place.
        fused_act = activation in ("relu", "none")
        out = op.binary(input, residual, w, bias, list(p), list(s), list(d), groups, "add", 1.0,
                        "relu" if activation == "relu" else None, [], "")
        if fused_act:
            return out, "onednn-fused"
        return apply_activation(out, activation, inplace=True), "onednn+activation"
    if not grad and fusable and input.is_cuda:
        out = cutlass_fused(input, weight, bias, residual, s, p, d, groups, activation)
        if out is not None:
            return out, "cutlass-fused"
    if not grad and fusable and activation == "relu" and input.is_cuda:
        out = _cudnn_fused(input, weight, bias, residual, s, p, d, groups)
        if out is not None:
            return out, "cudnn-fused"
    out = F.conv2d(input, weight, bias, s, p, d, groups)
    if residual is not None:
        # In place only where that is the same elementwise add (no broadcast or promotion).
        out = out.add_(residual) if not grad and fusable else out + residual
    return apply_activation(out, activation, inplace=not grad), "autograd" if grad else "conv+bias"


def _tallied(result: PathResult) -> torch.Tensor:
    """The output of ``(output, path)``, the path added to the process-wide tally."""
    EVAL_PATH_TALLY.add(result[1])
    return result[0]


def conv_bias_relu(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride=1,
                   padding=0, dilation=1, groups: int = 1,
                   packed_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``relu(conv2d(input, weight, bias))`` with no separate bias or ReLU pass.

    On the CPU with channels_last float32 input and autograd off, one oneDNN
    primitive with a fused ReLU post-op (on ``packed_weight`` when given, see
    :func:`pack_conv_weight`); otherwise conv2d with bias and an in-place ReLU.
    The output has the memory format eager conv2d would give.
    """
    return _tallied(_conv_bias_act(input, weight, bias, stride, padding, dilation, groups, "relu",
                                   packed_weight))


def conv_bn_act_eval(input: torch.Tensor, conv_weight, conv_bias, bn_weight, bn_bias,
                     running_mean, running_var, eps: float, stride=1, padding=0, dilation=1,
                     groups: int = 1, cache: Optional[FoldCache] = None,
                     activation: Optional[str] = "relu",
                     residual: Optional[torch.Tensor] = None,
                     dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``activation(batch_norm_eval(conv2d(input, conv_weight, conv_bias)) + residual)``
    with BN folded into the convolution (``residual`` None: no add; ``activation`` one
    of ``ACTIVATIONS`` or None).

    Without autograd: one oneDNN primitive (CPU, channels_last) or one cuDNN call
    (CUDA, ReLU) where the library fuses the whole expression, else conv2d with the
    folded bias and in-place add/activation. Under autograd (grad mode on and any
    input requiring grad) the fold is recomputed differentiably on every call;
    otherwise it comes from ``cache``. ``dtype``: compute the convolution in this dtype
    (``input`` must have it) with the fold made in float64 from the parameters' dtype
    (what autocast needs); default the parameters' dtype.
    """
    return _tallied(conv_bn_act_eval_with_path(
        input, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps,
        stride, padding, dilation, groups, cache, activation, residual, dtype))


def conv_bn_act_eval_with_path(input, conv_weight, conv_bias, bn_weight, bn_bias, running_mean,
                               running_var, eps, stride=1, padding=0, dilation=1, groups=1,
                               cache=None, activation="relu", residual=None, dtype=None
                               ) -> PathResult:
    """:func:`conv_bn_act_eval`'s output and the path that computed it (one of
    ``paths.EVAL_PATHS``; None under torch.compile, which traces the plain
    expression). Adds nothing to the tally: the caller does."""
    activation = check_activation(activation)
    if _is_compiling():
        # Under torch.compile: the plain expression (no caches, no library calls the
        # compiler cannot trace); the compiler fuses the fold and the epilogue itself.
        s, p, d = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
        w, b = fold_conv_bn(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps)
        if dtype is not None:
            w, b = w.to(dtype), b.to(dtype)
        out = F.conv2d(input, w, b, s, p, d, groups)
        out = apply_activation(out if residual is None else out + residual, activation, inplace=False)
        return out, None
    # The checks ran for the cache's previous call: skip them for a call with the same
    # shapes, dtypes and devices (per-call overhead matters at batch 1).
    signature = None
    if (cache is not None and isinstance(input, torch.Tensor) and isinstance(conv_weight, torch.Tensor)
            and (residual is None or isinstance(residual, torch.Tensor))):
        signature = (input.shape, input.dtype, input.device, conv_weight.shape, conv_weight.dtype,
                     conv_weight.device, stride, padding, dilation, groups, dtype,
                     None if residual is None else (residual.shape, residual.device))
    if signature is not None and signature == getattr(cache, "checked", (None,))[0]:
        s, p, d = cache.checked[1]
    else:
        s, p, d = _validate_conv(input, conv_weight, stride, padding, dilation, groups, dtype)
        if residual is not None:
            _check(isinstance(residual, torch.Tensor),
                   f"residual must be a torch.Tensor or None, got {type(residual).__name__}")
            _check(residual.device == input.device,
                   f"residual is on {residual.device} but input is on {input.device}")
        if signature is not None:
            cache.checked = (signature, (s, p, d))
    params = (conv_weight, conv_bias, bn_weight, bn_bias)
    if torch.is_grad_enabled() and (input.requires_grad or any(
            t is not None and t.requires_grad for t in params + (residual,))):
        w, b = fold_conv_bn(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps)
        if dtype is not None:
            w, b = w.to(dtype), b.to(dtype)
        out = F.conv2d(input, w, b, s, p, d, groups)
        if residual is not None:
            out = out + residual
        return apply_activation(out, activation, inplace=False), "autograd"
    cache = cache if cache is not None else FoldCache()
    key = None if signature is None else _replay_key(input, conv_weight, stride, padding, dilation,
                                                      groups, eps, activation, residual, dtype)
    caller_input, input = input, _to_channels_last(input, conv_weight)
    # On CUDA a channels_last input gets a channels_last folded weight (cached), which the
    # library calls would otherwise copy into that layout on every call.
    cl = (input.is_cuda and not input.is_contiguous()
          and input.is_contiguous(memory_format=torch.channels_last))
    (w, b), cacheable = cache.folded(conv_weight, conv_bias, bn_weight, bn_bias, running_mean,
                                     running_var, eps, dtype, channels_last=cl)
    packed = None
    if cacheable and _onednn_eligible(input):
        packed = cache.packed(w, s, p, d, groups, input)
    out, path = _conv_bias_act(input, w, b, s, p, d, groups, activation, packed, residual)
    if packed is not None and key is not None and path == "onednn-fused":
        cache.plan = (key, cache.fold.value, input is not caller_input,
                      (packed, b, list(p), list(s), list(d), groups))
    return out, path


def _replay_key(input, conv_weight, stride, padding, dilation, groups, eps, activation, residual,
                dtype):
    """What a replayed call must share with the recorded one (besides the fold's sources)."""
    return (input.shape, input.stride(), input.dtype, input.device, conv_weight.shape,
            stride, padding, dilation, groups, eps, activation, dtype, LAYOUT.active,
            None if residual is None else (residual.shape, residual.stride(), residual.dtype,
                                           residual.device))


def replay_eval(cache: FoldCache, input, conv_weight, conv_bias, bn_weight, bn_bias, running_mean,
                running_var, eps, stride, padding, dilation, groups, activation, residual):
    """The previous call's oneDNN fused convolution again (no checks, no path decisions)
    when this call is of the same kind (shapes, strides, dtypes, devices, convolution, no
    autograd) and the fold is current (its sources unchanged, as FoldCache checks):
    ``(output, "onednn-fused")``; else None. Cuts a fused conv's per-call Python to a few
    microseconds (batch 1). Adds nothing to the tally: the caller does."""
    plan = getattr(cache, "plan", None)
    if plan is None or torch.is_grad_enabled() or not isinstance(input, torch.Tensor):
        return None
    (key, fold, converts, call) = plan
    if residual is not None and not isinstance(residual, torch.Tensor):
        return None
    now = _replay_key(input, conv_weight, stride, padding, dilation, groups, eps, activation,
                      residual, None)
    if now != key or cache.fold.value is not fold:
        return None
    memo = cache.fold
    sources = (conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var)
    if _stamps(sources) != memo.key[0] or not all(a is b for a, b in zip(sources, memo.sources)):
        return None
    if converts:
        input = _to_channels_last(input, conv_weight)
    packed, b, p, s, d, groups = call
    op = torch.ops.mkldnn._convolution_pointwise
    if residual is None:
        unary, scalars = ONEDNN_UNARY[activation]
        return op(input, packed, b, p, s, d, groups, unary, scalars, ""), "onednn-fused"
    return op.binary(input, residual, packed, b, p, s, d, groups, "add", 1.0,
                     "relu" if activation == "relu" else None, [], ""), "onednn-fused"


def conv_bias(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride=1,
              padding=0, dilation=1, groups: int = 1,
              cache: Optional[PackCache] = None) -> torch.Tensor:
    """``conv2d(input, weight, bias)``; for channels_last float32 CPU input outside
    autograd, one oneDNN primitive on a weight prepacked once (in ``cache``)."""
    s, p, d = _validate_conv(input, weight, stride, padding, dilation, groups)
    if bias is None:
        return _tallied((F.conv2d(input, weight, None, s, p, d, groups), "conv+bias"))
    packed = None
    grad = torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad
                                        or bias.requires_grad)
    if not grad:
        input = _to_channels_last(input, weight)
    if cache is not None and not grad and _onednn_eligible(input) and _stamps((weight,)) is not None:
        packed = cache.packed(weight, s, p, d, groups, input)
    return _tallied(_conv_bias_act(input, weight, bias, s, p, d, groups, "none", packed))
