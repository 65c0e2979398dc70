"""Training Stage: conv2d -> fused BN+ReLU with a backward that recomputes the
convolution (see ``neptune_ext.stage.functional``), and the running-statistics update."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .._util import check as _check, is_compiling as _is_compiling
from .bn_relu import _bn_relu_backward_impl, _bn_relu_forward_impl
from .activations import apply_activation
from .checks import _pair, _validate_conv, _validate_tensor, conv_output_shape

__all__ = ["conv_bn_relu_train", "conv_bn_act_train", "update_running_stats"]


def _conv_grads(ctx, grad_x, input, conv_weight, bias_index: int, bias_only: bool = False):
    """(grad input, grad weight, grad conv bias) of the convolution whose output's gradient is
    grad_x (None where not needed). ``ctx.conv_args`` starts with stride, padding, dilation,
    groups; ``ctx.bias_like`` is the conv bias's (shape, dtype) or None, and
    ``bias_index`` its position among the Function's inputs.

    A conv bias cancels in the batch mean: its gradient is zero (eager computes it as a
    sum that rounds to about zero); a tensor, not None, so optimizers treat it alike.
    ``bias_only``: that zero alone."""
    stride, padding, dilation, groups = ctx.conv_args[:4]
    need_in, need_w = (False, False) if bias_only else ctx.needs_input_grad[:2]
    grad_in = grad_w = grad_bias = None
    if need_in or need_w:
        grad_in, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_x, input, conv_weight, None, list(stride), list(padding), list(dilation),
            False, [0, 0], groups, [need_in, need_w, False])
    if ctx.needs_input_grad[bias_index]:
        shape, dtype = ctx.bias_like
        grad_bias = grad_x.new_zeros(shape, dtype=dtype)
    return grad_in, grad_w, grad_bias


def _differentiable_backward(ctx, grad_y, tensors, conv_args, eps, activation, residual=None):
    """The gradients as a graph, for a backward called with ``create_graph=True`` (double
    backward: gradient penalties, meta-learning). The fused backwards are not differentiable
    themselves, so this recomputes the eager computation from the saved inputs (the
    forward's inputs, still attached to their graph) and differentiates that: eager's first
    and second derivatives. ``tensors``: the Function's first four inputs (input, conv
    weight, BN weight, BN bias); returns their gradients, then the residual's if given.

    Each input enters the recomputation through a fresh view and the gradients are taken
    with respect to those views: partial derivatives, as a backward must return. (With
    respect to the tensors themselves autograd would also follow their own history, e.g.
    from a residual block's identity through the conv input computed from it.)"""
    stride, padding, dilation, groups = conv_args
    candidates = list(tensors) + ([residual] if residual is not None else [])
    with torch.enable_grad(), torch.autocast(candidates[0].device.type, enabled=False):
        # (the forward ran with autocast off, on autocast's casts: the same arithmetic)
        views = [None if t is None else t.view_as(t) for t in candidates]
        x = F.conv2d(views[0], views[1], None, stride, padding, dilation, groups)
        z = F.batch_norm(x, None, None, views[2], views[3], True, 0.0, eps)
        if residual is not None:
            z = z + views[4]
        y = apply_activation(z, activation, inplace=False)
    wanted = [i for i, t in enumerate(candidates)
              if t is not None and ctx.needs_input_grad[min(i, 4)] and t.requires_grad]
    grads = torch.autograd.grad(y, [views[i] for i in wanted], grad_y, create_graph=True,
                                allow_unused=True)
    out = [None] * len(candidates)
    for i, g in zip(wanted, grads):
        out[i] = torch.zeros_like(candidates[i]) if g is None else g
    return out


class _ConvBnReluTrain(torch.autograd.Function):
    """conv2d -> bn_relu with a backward that recomputes the conv output (see module doc)."""

    @staticmethod
    def forward(ctx, input, conv_weight, bn_weight, bn_bias, stride, padding, dilation, groups,
                eps, recompute, conv_bias):
        x = F.conv2d(input, conv_weight, None, stride, padding, dilation, groups)
        y, mean, var, invstd = _bn_relu_forward_impl(x, bn_weight, bn_bias, eps)
        ctx.conv_args = (stride, padding, dilation, groups)
        ctx.eps = eps
        ctx.recompute = recompute
        ctx.bias_like = None if conv_bias is None else (conv_bias.shape, conv_bias.dtype)
        saved = (input, conv_weight, bn_weight, bn_bias, mean, invstd)
        ctx.save_for_backward(*(saved if recompute else saved + (x,)))
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        stride, padding, dilation, groups = ctx.conv_args
        input, conv_weight, bn_weight, bn_bias, mean, invstd, *rest = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            grad_in, grad_w, grad_bn_w, grad_bn_b = _differentiable_backward(
                ctx, grad_y, (input, conv_weight, bn_weight, bn_bias), ctx.conv_args, ctx.eps, "relu")
            _, _, grad_bias = _conv_grads(ctx, grad_y, input, conv_weight, bias_index=10,
                                          bias_only=True)
            return (grad_in, grad_w, grad_bn_w, grad_bn_b, None, None, None, None, None, None,
                    grad_bias)
        x = F.conv2d(input, conv_weight, None, stride, padding, dilation, groups) \
            if ctx.recompute else rest[0]
        grad_x, grad_bn_w, grad_bn_b = _bn_relu_backward_impl(
            grad_y, x, bn_weight, bn_bias, mean, invstd)
        del x
        need_bn_w, need_bn_b = ctx.needs_input_grad[2:4]
        grad_in, grad_w, grad_bias = _conv_grads(ctx, grad_x, input, conv_weight, bias_index=10)
        return (grad_in, grad_w, grad_bn_w if need_bn_w else None,
                grad_bn_b if need_bn_b else None, None, None, None, None, None, None, grad_bias)


def conv_bn_relu_train(input: torch.Tensor, conv_weight: torch.Tensor, bn_weight: torch.Tensor,
                       bn_bias: torch.Tensor, stride=1, padding=0, dilation=1, groups: int = 1,
                       eps: float = 1e-5, recompute: bool = True,
                       conv_bias: Optional[torch.Tensor] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``relu(batch_norm(conv2d(input, conv_weight)))`` with batch statistics.

    Returns ``(y, mean, var)`` like :func:`bn_relu`. Gradients equal eager's. With
    ``recompute=True`` the backward keeps only ``input`` (plus per-channel
    vectors) and recomputes the convolution output; with ``recompute=False`` it
    keeps the convolution output as eager does and skips the extra convolution.
    A ``conv_bias`` cancels in the output (batch statistics): it is not added, and
    gets a zero gradient (the caller adds it to ``mean`` for the running statistics).
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
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (
            input, conv_weight, bn_weight, bn_bias, conv_bias)):
        return _ConvBnReluTrain.apply(input, conv_weight, bn_weight, bn_bias, s, p, d, groups,
                                      float(eps), bool(recompute), conv_bias)
    x = F.conv2d(input, conv_weight, None, s, p, d, groups)
    y, mean, var, _ = _bn_relu_forward_impl(x, bn_weight, bn_bias, float(eps))
    return y, mean, var


def _activation_mask(z: torch.Tensor, activation: str):
    """Where activation(z) passes its gradient (as eager's backward decides), or None (all)."""
    if activation == "relu":
        return z > 0
    if activation == "relu6":
        return (z > 0) & (z < 6)
    return None


class _ConvBnActTrain(torch.autograd.Function):
    """conv2d -> BN with batch statistics (+ residual) -> ReLU / ReLU6 / nothing.

    Saves the convolution's input and weight, the BN parameters and statistics, and the
    residual (a tensor the block keeps anyway: its input, which its first conv saves), but
    neither the convolution's output nor the block's output: the backward recomputes the
    convolution and the BN (bit-identical to the forward's: the same deterministic ops), takes
    the activation's mask from that, and BN's input gradient from ATen's own batch-norm
    backward, so gradients are eager's. Nothing saved aliases the output, so in-place ops
    on it later (a shared ReLU module reapplied) stay legal.
    """

    @staticmethod
    def forward(ctx, input, conv_weight, bn_weight, bn_bias, residual, stride, padding, dilation,
                groups, eps, activation, conv_bias):
        x = F.conv2d(input, conv_weight, None, stride, padding, dilation, groups)
        z, mean, invstd = torch.native_batch_norm(x, bn_weight, bn_bias, None, None, True, 0.0, eps)
        del x
        if residual is not None:
            z = z.add_(residual) if residual.dtype == z.dtype else z + residual
        y = apply_activation(z, activation, inplace=True)
        ctx.conv_args = (stride, padding, dilation, groups, eps, activation)
        ctx.bias_like = None if conv_bias is None else (conv_bias.shape, conv_bias.dtype)
        ctx.residual_dtype = None if residual is None else residual.dtype
        ctx.save_for_backward(input, conv_weight, bn_weight, bn_bias, mean, invstd, residual)
        var = invstd.double().pow(-2).sub(eps).clamp_min(0).to(mean.dtype)  # biased batch variance
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        stride, padding, dilation, groups, eps, activation = ctx.conv_args
        input, conv_weight, bn_weight, bn_bias, mean, invstd, residual = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            grads = _differentiable_backward(ctx, grad_y, (input, conv_weight, bn_weight, bn_bias),
                                             ctx.conv_args[:4], eps, activation, residual)
            grad_res = None if residual is None else grads[4]
            if grad_res is not None and grad_res.dtype != ctx.residual_dtype:
                grad_res = grad_res.to(ctx.residual_dtype)
            _, _, grad_bias = _conv_grads(ctx, grad_y, input, conv_weight, bias_index=11,
                                          bias_only=True)
            return (*grads[:4], grad_res, None, None, None, None, None, None, grad_bias)
        x = F.conv2d(input, conv_weight, None, stride, padding, dilation, groups)
        dz = grad_y
        if activation != "none":
            z, _, _ = torch.native_batch_norm(x, bn_weight, bn_bias, None, None, True, 0.0, eps)
            if residual is not None:
                z = z.add_(residual) if residual.dtype == z.dtype else z + residual
            dz = grad_y * _activation_mask(z, activation)
            del z
        need_in, need_w, need_bn_w, need_bn_b, need_res = ctx.needs_input_grad[:5]
        grad_res = dz.to(ctx.residual_dtype) if need_res else None
        dx, grad_bn_w, grad_bn_b = torch.ops.aten.native_batch_norm_backward(
            dz.to(x.dtype), x, bn_weight, None, None, mean, invstd, True, eps,
            [need_in or need_w, need_bn_w and bn_weight is not None, need_bn_b and bn_bias is not None])
        del x
        grad_in, grad_w, grad_bias = _conv_grads(ctx, dx, input, conv_weight, bias_index=11)
        return (grad_in, grad_w, grad_bn_w if need_bn_w else None, grad_bn_b if need_bn_b else None,
                grad_res, None, None, None, None, None, None, grad_bias)


def conv_bn_act_train(input: torch.Tensor, conv_weight: torch.Tensor,
                      bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
                      residual: Optional[torch.Tensor] = None, stride=1, padding=0, dilation=1,
                      groups: int = 1, eps: float = 1e-5, activation: str = "relu",
                      conv_bias: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``activation(batch_norm(conv2d(input, conv_weight)) + residual)`` with batch
    statistics, for ``activation`` in relu, relu6, none and a ``residual`` of the output's
    shape (or None), keeping only the convolution's input and the residual for backward.

    Returns ``(y, mean, var)`` (biased batch variance; float32 statistics for half
    inputs). Gradients are eager's. A ``conv_bias`` cancels, as in
    :func:`conv_bn_relu_train`.
    """
    _check(activation in ("relu", "relu6", "none"),
           f"activation must be 'relu', 'relu6' or 'none' here, got {activation!r}")
    s, p, d = _validate_conv(input, conv_weight, stride, padding, dilation, groups)
    if residual is not None:
        shape = conv_output_shape(input, conv_weight, s, p, d)
        _check(isinstance(residual, torch.Tensor) and list(residual.shape) == shape,
               f"residual must be a tensor of the output's shape {shape}")
    # (Outside autograd, apply runs the forward alone; nothing it saves outlives the call.)
    return _ConvBnActTrain.apply(input, conv_weight, bn_weight, bn_bias, residual, s, p, d,
                                 groups, float(eps), activation, conv_bias)


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
