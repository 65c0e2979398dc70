"""The layers' node projections ``x W^T + b``: a plain Linear, computed by
``neptune::linear`` where that is faster (csrc/linear/linear.h).

On the CPU, torch's Linear runs its float32 GEMMs through MKL; on some machines oneDNN's
matmul (also in torch) is 2-2.5x faster for the projections of a graph layer (measured on an
AMD EPYC VM: ``benchmarks/results/cpu-2core-2026-12-05-projection.json``). The op takes
oneDNN where it applies and at::linear / at::mm elsewhere; the choice depends on dtype and
shapes only. Its autograd is C++ (one op call in backward; ``create_graph=True`` gets
differentiable ATen matmuls).

:func:`project` calls it for a module only when that changes nothing but the speed: a
``torch.nn.Linear`` exactly (no subclass, parametrization or hook, on it or global), float32
on the CPU outside autocast (autocast runs torch's Linear in bfloat16, which we keep), inside
no torch.func transform or forward-mode AD, and a product big enough to gain (below it,
the module is called). Everything else calls the module.
"""
import torch
from torch import nn

from .. import _ext
from .spec import runs_kernel

Tensor = torch.Tensor

# Multiply-adds below which the module's own call is as fast (csrc/linear/linear_cpu.cpp).
MIN_MACS = 1 << 20


def plain_linear(m) -> bool:
    """A torch Linear computing exactly ``x W^T + b``: not a subclass or a parametrized
    module, and no forward hook or pre-hook (on it, or global) that could change it."""
    hooks = torch.nn.modules.module
    return (type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks)
            and not (hooks._global_forward_hooks or hooks._global_forward_pre_hooks))


def _autocast_cpu() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def project(lin: nn.Module, x: Tensor) -> Tensor:
    """``lin(x)``, through ``neptune::linear`` where it is the same computation done faster."""
    if (x.device.type == "cpu" and x.dim() == 2 and x.dtype == torch.float32 and plain_linear(lin)
            and lin.weight.dtype == torch.float32 and lin.weight.device.type == "cpu"
            and x.shape[0] * x.shape[1] * lin.weight.shape[0] >= MIN_MACS
            and not _autocast_cpu() and runs_kernel("linear", "cpu")):
        return torch.ops.neptune.linear(x, lin.weight, lin.bias)
    return lin(x)


def linear_weights(x: Tensor, weight: Tensor, bias) -> Tensor:
    """``F.linear(x, weight, bias)`` for weights a layer assembled itself (the keys' and
    values' in one GEMM), through ``neptune::linear`` under :func:`project`'s conditions."""
    if (x.device.type == "cpu" and x.dim() == 2 and x.dtype == torch.float32
            and weight.dtype == torch.float32 and x.shape[0] * x.shape[1] * weight.shape[0] >= MIN_MACS
            and not _autocast_cpu() and runs_kernel("linear", "cpu")):
        return torch.ops.neptune.linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


if _ext._C is not None and hasattr(torch.ops.neptune, "linear"):
    @torch.library.register_fake("neptune::linear")
    def _linear_fake(x, weight, bias):
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("neptune::linear_backward")
    def _linear_backward_fake(grad_out, x, weight, output_mask):
        return (x.new_empty(x.shape) if output_mask[0] else x.new_empty((0,)),
                weight.new_empty(weight.shape) if output_mask[1] else x.new_empty((0,)),
                weight.new_empty((weight.shape[0],)) if output_mask[2] else x.new_empty((0,)))
