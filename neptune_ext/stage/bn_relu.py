"""The fused BatchNorm+ReLU op (batch statistics): kernel dispatch, registration of its
fake kernels and autograd, and ``bn_relu``. See ``neptune_ext.stage.functional``."""
from typing import Tuple

import torch

from .. import _ext, backend as _backend
from .._util import acc_dtype, is_compiling as _is_compiling
from .reference import bn_relu_backward_reference, bn_relu_forward_reference
from .checks import _validate_bn

__all__ = ["bn_relu"]


def _has_stage_kernel(device_type: str) -> bool:
    return _backend.registered("bn_relu_forward", device_type)


def _use_stage_kernels(device_type: str) -> bool:
    return _backend.runs_kernel("bn_relu_forward", device_type)


def _bn_relu_forward_impl(x, weight, bias, eps):
    if _use_stage_kernels(x.device.type):
        return torch.ops.neptune.bn_relu_forward(x, weight, bias, eps)
    return bn_relu_forward_reference(x, weight, bias, eps)


def _bn_relu_backward_impl(grad_y, x, weight, bias, mean, invstd):
    if _use_stage_kernels(x.device.type):
        return torch.ops.neptune.bn_relu_backward(grad_y, x, weight, bias, mean, invstd)
    return bn_relu_backward_reference(grad_y, x, weight, bias, mean, invstd)


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


# ----------------------------------------------------------------------------
# torch.library registrations (fake kernels + autograd) for the compiled ops.

def _dense_like(x):
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return torch.empty_like(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _differentiable_backward(ctx, grad_y, x, weight, bias):
    """(grad x, grad weight, grad bias) as a graph: the reference forward recomputed from the
    saved inputs (through fresh views: partial derivatives) and differentiated."""
    with torch.enable_grad():
        views = [t.view_as(t) for t in (x, weight, bias)]
        y = bn_relu_forward_reference(*views, ctx.eps)[0]
    wanted = [i for i, t in enumerate((x, weight, bias)) if ctx.needs_input_grad[i] and t.requires_grad]
    grads = torch.autograd.grad(y, [views[i] for i in wanted], grad_y, create_graph=True,
                                allow_unused=True)
    out = [None, None, None]
    for i, g in zip(wanted, grads):
        out[i] = torch.zeros_like(views[i]) if g is None else g
    return out


def _register():
    lib = "neptune::bn_relu_forward"

    @torch.library.register_fake(lib)
    def _bn_relu_forward_fake(x, weight, bias, eps):
        C = x.shape[1]
        acc = acc_dtype(x.dtype)
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
        ctx.eps = eps

    def backward(ctx, grad_y, _gm, _gv, _gi):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True (double backward): the backward kernel has no derivative, so
            # differentiate the reference forward instead (eager's second derivatives).
            return (*_differentiable_backward(ctx, grad_y, x, weight, bias), None)
        gx, gw, gb = torch.ops.neptune.bn_relu_backward(grad_y, x, weight, bias, mean, invstd)
        return gx, gw, gb, None

    torch.library.register_autograd(lib, backward, setup_context=setup_context)


if _ext._C is not None:
    _register()
