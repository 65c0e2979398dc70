"""Stage (Conv2d -> BatchNorm2d -> ReLU): validation, autograd, fake kernels, dispatch.

Training (batch statistics):

    x = conv2d(input, conv_weight)                      ATen / oneDNN
    y, mean, var = bn_relu(x, bn_weight, bn_bias, eps)  torch.ops.neptune.bn_relu_forward

The backward of BN+ReLU needs x everywhere, also where y = 0:
``grad_x = w * invstd * (dz - mean(dz) - x_hat * mean(dz * x_hat))`` is not zero
there, and x_hat cannot be recovered from y = 0. :func:`conv_bn_relu_train`
therefore saves only the convolution's *input* (which the convolution's own
backward needs anyway, and which in a stack of Stages is the previous Stage's
output) and recomputes x in backward: one extra convolution forward per Stage in
exchange for not storing x — about half the activation memory of eager.

Evaluation (running statistics): BN is folded into the convolution's weight and
bias (:func:`fold_conv_bn`, cached by :class:`FoldCache`) and
:func:`conv_bias_relu` runs convolution + bias + ReLU in one oneDNN primitive
(fused ReLU post-op on prepacked weights) where the installed torch exposes it.

Without the compiled extension (or for devices it has no Stage kernel for) the
pure-PyTorch reference in ``neptune_ext.reference_stage`` runs instead.
"""
import functools
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import _ext
from ..graph import _is_compiling
from .graph_attention import _check
from ..reference_stage import bn_relu_backward_reference, bn_relu_forward_reference

__all__ = ["bn_relu", "conv_bn_relu_train", "update_running_stats", "fold_conv_bn",
           "conv_bn_relu_eval", "conv_bias_relu", "conv_bias", "pack_conv_weight", "FoldCache",
           "PackCache", "onednn_fused_available"]


@functools.lru_cache(maxsize=None)
def _has_stage_kernel(device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "neptune::bn_relu_forward", key)


def _use_stage_kernels(device_type: str) -> bool:
    # use_kernels warns once when the extension is missing; the second test covers
    # devices the build has kernels for in general but not for the Stage ops yet.
    return _ext.use_kernels(device_type) and _has_stage_kernel(device_type)


def _bn_relu_forward_impl(x, weight, bias, eps):
    if _use_stage_kernels(x.device.type):
        return torch.ops.neptune.bn_relu_forward(x, weight, bias, eps)
    return bn_relu_forward_reference(x, weight, bias, eps)


def _bn_relu_backward_impl(grad_y, x, weight, bias, mean, invstd):
    if _use_stage_kernels(x.device.type):
        return torch.ops.neptune.bn_relu_backward(grad_y, x, weight, bias, mean, invstd)
    return bn_relu_backward_reference(grad_y, x, weight, bias, mean, invstd)


# ----------------------------------------------------------------------------
# Validation

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
    if isinstance(v, int):
        return (v, v)
    _check(isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v),
           f"{name} must be an int or a pair of ints, got {v!r}")
    return tuple(v)


def _validate_conv(input, conv_weight, stride, padding, dilation, groups):
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
    _check(input.dtype == conv_weight.dtype,
           f"input ({input.dtype}) and conv_weight ({conv_weight.dtype}) must share one dtype")
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


# ----------------------------------------------------------------------------
# Training: BN + ReLU with batch statistics

def bn_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``relu(batch_norm(x))`` with batch statistics, fused; differentiable in x, weight, bias.

    Args:
        x: [N, C, H, W], NCHW-contiguous or channels_last (the layout is kept).
        weight, bias: [C] affine parameters of the BatchNorm.
        eps: added to the variance.

    Returns:
        ``(y, mean, var)``: the output, and the batch mean and *biased* variance
        per channel (float32, float64 for float64 x; not differentiable) from
        which the caller updates running statistics (see :func:`update_running_stats`).

    This op saves x for its backward. :func:`conv_bn_relu_train` saves less.

    Example::

        >>> y, mean, var = bn_relu(torch.randn(2, 3, 4, 4), torch.ones(3), torch.zeros(3))
        >>> bool((y >= 0).all())
        True
    """
    if not _is_compiling():
        _validate_bn("x", x, weight, bias, eps)
    y, mean, var, _ = _bn_relu_forward_impl(x, weight, bias, float(eps))
    return y, mean, var


class _ConvBnReluTrain(torch.autograd.Function):
    """conv2d -> bn_relu with a backward that recomputes the conv output (see module doc)."""

    @staticmethod
    def forward(ctx, input, conv_weight, bn_weight, bn_bias, stride, padding, dilation, groups,
                eps, recompute):
        x = F.conv2d(input, conv_weight, None, stride, padding, dilation, groups)
        y, mean, var, invstd = _bn_relu_forward_impl(x, bn_weight, bn_bias, eps)
        ctx.conv_args = (stride, padding, dilation, groups)
        ctx.recompute = recompute
        saved = (input, conv_weight, bn_weight, bn_bias, mean, invstd)
        ctx.save_for_backward(*(saved if recompute else saved + (x,)))
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        stride, padding, dilation, groups = ctx.conv_args
        input, conv_weight, bn_weight, bn_bias, mean, invstd, *rest = ctx.saved_tensors
        x = F.conv2d(input, conv_weight, None, stride, padding, dilation, groups) \
            if ctx.recompute else rest[0]
        grad_x, grad_bn_w, grad_bn_b = _bn_relu_backward_impl(
            grad_y, x, bn_weight, bn_bias, mean, invstd)
        del x
        need_in, need_w, need_bn_w, need_bn_b = ctx.needs_input_grad[:4]
        grad_in = grad_w = None
        if need_in or need_w:
            grad_in, grad_w, _ = torch.ops.aten.convolution_backward(
                grad_x, input, conv_weight, None, list(stride), list(padding), list(dilation),
                False, [0, 0], groups, [need_in, need_w, False])
        return (grad_in, grad_w, grad_bn_w if need_bn_w else None,
                grad_bn_b if need_bn_b else None, None, None, None, None, None, None)


def conv_bn_relu_train(input: torch.Tensor, conv_weight: torch.Tensor, bn_weight: torch.Tensor,
                       bn_bias: torch.Tensor, stride=1, padding=0, dilation=1, groups: int = 1,
                       eps: float = 1e-5, recompute: bool = True
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``relu(batch_norm(conv2d(input, conv_weight)))`` with batch statistics.

    Returns ``(y, mean, var)`` like :func:`bn_relu`. Gradients equal eager's. With
    ``recompute=True`` the backward keeps only ``input`` (plus per-channel
    vectors) and recomputes the convolution output; with ``recompute=False`` it
    keeps the convolution output as eager does and skips the extra convolution.
    """
    if not _is_compiling():
        s, p, d = _validate_conv(input, conv_weight, stride, padding, dilation, groups)
        C = conv_weight.shape[0]
        for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias)):
            _validate_tensor(name, t, input.device)
            _check(t.shape == (C,), f"{name} must have shape [C_out] = [{C}], got {list(t.shape)}")
        _check(isinstance(eps, (int, float)) and eps > 0, f"eps must be a positive float, got {eps!r}")
        H = (input.shape[2] + 2 * p[0] - d[0] * (conv_weight.shape[2] - 1) - 1) // s[0] + 1
        W = (input.shape[3] + 2 * p[1] - d[1] * (conv_weight.shape[3] - 1) - 1) // s[1] + 1
        _check(input.shape[0] * H * W > 1,
               f"Expected more than 1 value per channel when training, got input size "
               f"{list(input.shape)} (conv output {[input.shape[0], C, H, W]})")
    else:
        s, p, d = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (input, conv_weight, bn_weight, bn_bias)):
        return _ConvBnReluTrain.apply(input, conv_weight, bn_weight, bn_bias, s, p, d, groups,
                                      float(eps), bool(recompute))
    x = F.conv2d(input, conv_weight, None, s, p, d, groups)
    y, mean, var, _ = _bn_relu_forward_impl(x, bn_weight, bn_bias, float(eps))
    return y, mean, var


@torch.no_grad()
def update_running_stats(running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                         mean: torch.Tensor, var: torch.Tensor, count: int, factor: float) -> None:
    """In place, as ``nn.BatchNorm2d`` does in training:
    ``running = (1 - factor) * running + factor * batch``, with the *unbiased*
    batch variance ``var * count / (count - 1)`` (count = N*H*W)."""
    if running_mean is not None:
        running_mean.copy_(mean * factor + running_mean * (1.0 - factor))
    if running_var is not None:
        unbiased = var * (count / (count - 1))
        running_var.copy_(unbiased * factor + running_var * (1.0 - factor))


# ----------------------------------------------------------------------------
# Evaluation: folded BN, conv + bias + ReLU

def fold_conv_bn(conv_weight: torch.Tensor, conv_bias: Optional[torch.Tensor],
                 bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
                 running_mean: torch.Tensor, running_var: torch.Tensor, eps: float,
                 compute_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the convolution equivalent to conv -> BN(eval):

        scale = bn_weight / sqrt(running_var + eps)
        W'    = conv_weight * scale[:, None, None, None]
        b'    = (conv_bias - running_mean) * scale + bn_bias

    Differentiable. ``compute_dtype`` (e.g. float64) computes in higher precision
    and casts the result back to conv_weight's dtype.
    """
    dt = compute_dtype or conv_weight.dtype
    C = conv_weight.shape[0]
    rv = running_var.to(dt)
    scale = torch.rsqrt(rv + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(dt)
    shift = -running_mean.to(dt) if conv_bias is None else conv_bias.to(dt) - running_mean.to(dt)
    bias = shift * scale
    if bn_bias is not None:
        bias = bias + bn_bias.to(dt)
    weight = conv_weight.to(dt) * scale.reshape(C, 1, 1, 1)
    return weight.to(conv_weight.dtype), bias.to(conv_weight.dtype)


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


def _onednn_dtypes():
    dts = {torch.float32}
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            dts.add(torch.bfloat16)
    except Exception:  # noqa: BLE001
        pass
    return dts


_ONEDNN_DTYPES = None


def _onednn_eligible(input: torch.Tensor) -> bool:
    """oneDNN's fused path runs for CPU float32 (bf16 where supported) channels_last
    input outside autograd. For NCHW input its output would come back channels_last
    (a layout change a drop-in layer must not make), so NCHW takes conv + relu_."""
    global _ONEDNN_DTYPES
    if not (input.device.type == "cpu" and torch.backends.mkldnn.enabled and onednn_fused_available()):
        return False
    if _ONEDNN_DTYPES is None:
        _ONEDNN_DTYPES = _onednn_dtypes()
    return (input.dtype in _ONEDNN_DTYPES and not input.is_contiguous()
            and input.is_contiguous(memory_format=torch.channels_last))


def pack_conv_weight(weight: torch.Tensor, stride, padding, dilation, groups: int,
                     input_size: Sequence[int]) -> torch.Tensor:
    """oneDNN-prepacked (opaque, inference-only) copy of a conv weight."""
    return torch.ops.mkldnn._reorder_convolution_weight(
        weight, list(padding), list(stride), list(dilation), groups, list(input_size))


def _conv_bias_act(input, weight, bias, stride, padding, dilation, groups, relu: bool,
                   packed_weight=None):
    s, p, d = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    grad = torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad
                                        or bias.requires_grad)
    if not grad and _onednn_eligible(input):
        w = packed_weight if packed_weight is not None else weight
        return torch.ops.mkldnn._convolution_pointwise(
            input, w, bias, list(p), list(s), list(d), groups, "relu" if relu else "none", [], "")
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


def _stamps(tensors):
    """(version, data_ptr, dtype, device) per tensor; None if one is an inference tensor
    (those have no version counter)."""
    try:
        return tuple(None if t is None else (t._version, t.data_ptr(), t.dtype, t.device)
                     for t in tensors)
    except RuntimeError:
        return None


class _Memo:
    """One value derived from some tensors, rebuilt when any of them changes.

    The key holds each source tensor itself (so its memory cannot be reused by
    another tensor while cached), its version counter (bumped by every in-place
    write: optimizer steps, load_state_dict's copy_, ...), data_ptr, dtype and
    device, plus hashable extras. With inference tensors nothing is cached.
    """

    def __init__(self):
        self.clear()

    def clear(self):
        self.sources, self.key, self.value = None, None, None

    def get(self, sources, extra, build):
        stamps = _stamps(sources)
        if stamps is None:
            self.clear()
            return build(), False
        key = (stamps, extra)
        if (self.sources is None or key != self.key
                or not all(a is b for a, b in zip(sources, self.sources))):
            self.value = build()
            self.sources, self.key = tuple(sources), key
        return self.value, True


class PackCache:
    """A conv weight prepacked for oneDNN, repacked when the weight or the input shape changes."""

    def __init__(self):
        self.pack = _Memo()

    def clear(self):
        self.pack.clear()

    def packed(self, weight, stride, padding, dilation, groups, input):
        shape = tuple(input.shape)
        value, _ = self.pack.get((weight,), (shape, tuple(stride), tuple(padding), tuple(dilation), groups),
                                 lambda: pack_conv_weight(weight, stride, padding, dilation, groups, shape))
        return value


class FoldCache(PackCache):
    """The folded weight/bias (and the oneDNN-packed folded weight) of one conv + BN pair,
    rebuilt whenever a parameter or buffer changes (see _Memo)."""

    def __init__(self):
        super().__init__()
        self.fold = _Memo()

    def clear(self):
        super().clear()
        self.fold.clear()

    def folded(self, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps):
        """((weight, bias), cacheable)."""
        sources = (conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var)

        def build():
            with torch.no_grad():
                return fold_conv_bn(*sources, eps, compute_dtype=torch.float64)
        return self.fold.get(sources, float(eps), build)


def conv_bn_relu_eval(input: torch.Tensor, conv_weight, conv_bias, bn_weight, bn_bias,
                      running_mean, running_var, eps: float, stride=1, padding=0, dilation=1,
                      groups: int = 1, cache: Optional[FoldCache] = None) -> torch.Tensor:
    """``relu(batch_norm_eval(conv2d(input, conv_weight, conv_bias)))`` with BN folded.

    Under autograd (grad mode on and any input requiring grad) the fold is
    recomputed differentiably on every call; otherwise it comes from ``cache``.
    """
    s, p, d = _validate_conv(input, conv_weight, stride, padding, dilation, groups)
    params = (conv_weight, conv_bias, bn_weight, bn_bias)
    if torch.is_grad_enabled() and (input.requires_grad or any(
            t is not None and t.requires_grad for t in params)):
        w, b = fold_conv_bn(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps)
        return F.conv2d(input, w, b, s, p, d, groups).clamp_min(0)
    cache = cache if cache is not None else FoldCache()
    (w, b), cacheable = cache.folded(conv_weight, conv_bias, bn_weight, bn_bias, running_mean,
                                     running_var, eps)
    packed = None
    if cacheable and _onednn_eligible(input):
        packed = cache.packed(w, s, p, d, groups, input)
    return conv_bias_relu(input, w, b, s, p, d, groups, packed_weight=packed)


def conv_bias(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride=1,
              padding=0, dilation=1, groups: int = 1,
              cache: Optional[PackCache] = None) -> torch.Tensor:
    """``conv2d(input, weight, bias)``; for channels_last float32 CPU input outside
    autograd, one oneDNN primitive on a weight prepacked once (in ``cache``)."""
    s, p, d = _validate_conv(input, weight, stride, padding, dilation, groups)
    if bias is None:
        return F.conv2d(input, weight, None, s, p, d, groups)
    packed = None
    grad = torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad
                                        or bias.requires_grad)
    if cache is not None and not grad and _onednn_eligible(input) and _stamps((weight,)) is not None:
        packed = cache.packed(weight, s, p, d, groups, input)
    return _conv_bias_act(input, weight, bias, s, p, d, groups, False, packed)


# ----------------------------------------------------------------------------
# torch.library registrations (fake kernels + autograd) for the compiled ops.

def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dense_like(x):
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return torch.empty_like(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _register():
    lib = "neptune::bn_relu_forward"

    @torch.library.register_fake(lib)
    def _bn_relu_forward_fake(x, weight, bias, eps):
        C = x.shape[1]
        acc = _acc(x.dtype)
        return (_dense_like(x), x.new_empty((C,), dtype=acc), x.new_empty((C,), dtype=acc),
                x.new_empty((C,), dtype=acc))

    @torch.library.register_fake("neptune::bn_relu_backward")
    def _bn_relu_backward_fake(grad_y, x, weight, bias, mean, invstd):
        return _dense_like(x), weight.new_empty(weight.shape), bias.new_empty(bias.shape)

    def setup_context(ctx, inputs, output):
        x, weight, bias, eps = inputs
        _, mean, var, invstd = output
        ctx.mark_non_differentiable(mean, var, invstd)
        ctx.save_for_backward(x, weight, bias, mean, invstd)

    def backward(ctx, grad_y, _gm, _gv, _gi):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        gx, gw, gb = torch.ops.neptune.bn_relu_backward(grad_y, x, weight, bias, mean, invstd)
        return gx, gw, gb, None

    torch.library.register_autograd(lib, backward, setup_context=setup_context)


if _ext._C is not None:
    _register()
