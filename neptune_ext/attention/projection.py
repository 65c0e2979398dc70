"""The layers' node projections ``x W^T + b``: a plain Linear, computed by
``neptune::linear`` where that is faster (csrc/linear/linear.h).

On the CPU, torch's Linear runs its float32 GEMMs through MKL. On an AMD EPYC VM oneDNN's
matmul (also in torch) did a graph layer's projection 1.2-1.8x faster, forward and backward
(``benchmarks/results/cpu-2core-2026-12-05-projection.json``); on an Intel Xeon VM it was
0.85-1.0x (``cpu-2core-2026-12-05-xeon-projection.json``). So the layers take oneDNN only
where the CPU is one where it won (:data:`USE_ONEDNN`: AMD x86 CPUs, as
``neptune::linear_prefers_onednn`` reports; the environment variable
``NEPTUNE_LINEAR_ONEDNN=1`` or ``0`` overrides it at import).

On any CPU, a projection whose output is large (:data:`CACHE_MIN_BYTES`, a large graph's
nodes) takes the op too, with oneDNN off: the same addmm/mm torch's Linear calls, the same
numbers to the bit, but its output, and in backward its input's gradient, come from the
extension's cache of freed CPU buffers (csrc/memory/cpu_alloc.h) instead of a fresh
mapping whose every page faults on first touch - on the 1M-edge graph each projection's
output is 51 MB and the faults cost about as much as the GEMM. Its autograd is C++ (one op
call in backward; ``create_graph=True`` gets differentiable ATen matmuls).

:func:`project` calls the op for a module only when that changes nothing but the speed: a
``torch.nn.Linear`` exactly (no subclass, parametrization or hook, on it or global), on the
CPU outside autocast (autocast runs torch's Linear in bfloat16, which we keep), inside no
torch.func transform or forward-mode AD, float32 and a product big enough to gain on a CPU
where oneDNN wins, or float32/float64 with a large output and the cache on (not under
torch.compile, whose own buffers these are). Everything else calls the module.
"""
import os
import warnings

import torch
from torch import nn

from .. import _ext
from .._util import is_compiling as _is_compiling
from .spec import runs_kernel

Tensor = torch.Tensor

# Multiply-adds below which the module's own call is as fast (csrc/linear/linear_cpu.cpp).
MIN_MACS = 1 << 20
#: Output bytes from which a projection's output comes from the cache of CPU buffers: the
#: cache's own minimum (csrc/memory/cpu_alloc.cpp); smaller blocks come from the C library's
#: heap, already resident.
CACHE_MIN_BYTES = 2 << 20


def _use_onednn_default() -> bool:
    env = os.environ.get("NEPTUNE_LINEAR_ONEDNN", "").strip()
    if env in ("0", "1"):
        return env == "1"
    if env:
        warnings.warn(f"NEPTUNE_LINEAR_ONEDNN must be 0 or 1 (or unset: the CPU decides), got {env!r}; "
                      "ignoring it", RuntimeWarning, stacklevel=2)
    op = getattr(torch.ops.neptune, "linear_prefers_onednn", None) if _ext._C is not None else None
    return bool(op()) if op is not None else False


#: Whether the layers' projections take ``neptune::linear`` on this machine (read at every
#: call: a program or test may set it).
USE_ONEDNN = _use_onednn_default()


def plain_linear(m) -> bool:
    """A torch Linear computing exactly ``x W^T + b`` whose call does nothing else: not a
    subclass or a parametrized module, no ``forward`` replaced on the instance, and no hook
    of any kind (forward, forward pre-, backward, backward pre-; on it or global) that
    calling it would run."""
    g = torch.nn.modules.module
    return (type(m) is nn.Linear and "forward" not in m.__dict__
            and not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                     or getattr(m, "_backward_pre_hooks", None))
            and not (g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
                     or getattr(g, "_global_backward_pre_hooks", None)))


def _autocast_cpu() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _cache_on() -> bool:
    return _ext._C is not None and torch.ops.neptune.cpu_cache_info()[0] > 0


def _op_route(x: Tensor, weight: Tensor):
    """How a plain Linear's ``x W^T + b`` is computed: None (the module's own call), or
    ``neptune::linear``'s ``onednn`` flag. The op needs dense CPU operands of one dtype, a 2-D
    input, no autocast and the kernel allowed here (neptune_ext.backend, torch.func
    transforms); then oneDNN on a CPU where it wins (:data:`USE_ONEDNN`) for a float32 product
    worth its call, else torch's GEMM for a float32/float64 output of at least
    :data:`CACHE_MIN_BYTES` while the cache is on. Under torch.compile / torch.export only the
    oneDNN route is taken, without asking the size (that would guard the node count: the
    kernel itself sends small products to torch's GEMM)."""
    if not (x.device.type == "cpu" and x.layout == torch.strided and x.dim() == 2
            and weight.device.type == "cpu" and weight.layout == torch.strided
            and weight.dtype == x.dtype and not _autocast_cpu() and runs_kernel("linear", "cpu")):
        return None
    compiling = _is_compiling()
    if USE_ONEDNN and x.dtype == torch.float32 and (
            compiling or x.shape[0] * x.shape[1] * weight.shape[0] >= MIN_MACS):
        return True
    if (not compiling and x.dtype in (torch.float32, torch.float64)
            and x.shape[0] * weight.shape[0] * x.element_size() >= CACHE_MIN_BYTES and _cache_on()):
        return False
    return None


def projects_fresh(lin: nn.Module, x: Tensor) -> bool:
    """Whether :func:`project` (lin, x) returns a new tensor of ``neptune::linear``'s that no
    hook, module or autograd node holds (its autograd keeps the input and weight, not the
    output): the caller may then add into it in place."""
    return plain_linear(lin) and _op_route(x, lin.weight) is not None


def project(lin: nn.Module, x: Tensor) -> Tensor:
    """``lin(x)``, through ``neptune::linear`` where it is the same computation done faster."""
    if plain_linear(lin):
        route = _op_route(x, lin.weight)
        if route is not None:
            return torch.ops.neptune.linear(x, lin.weight, lin.bias, route)
    return lin(x)


# Input features from which stacking a layer's projections into one GEMM gains: the one GEMM
# saves a fraction of the GEMMs' time (which grows with the input features), the kernels copy
# each column slice of its output dense (which does not). On the Xeon VM, 2 threads, a pair of
# projections (forward + weight gradient, the slices copied as the ops do) stacked took
# 0.93x the time at 2,708 x 1,433 -> 2 x 64, 0.98x at 19,717 x 500 -> 2 x 64, 1.12x at
# 20,000 x 128 -> 2 x 64 and 1.75x at 60,000 x 128 -> 2 x 256.
STACK_MIN_IN = 1024


def project_stack(mods, x: Tensor):
    """``tuple(m(x) for m in mods)`` for Linears of one input, as one GEMM over their stacked
    weights where all are plain Linears (:func:`plain_linear`) of one input size (at least
    :data:`STACK_MIN_IN`) and dtype, all with a bias or none, ``x`` is dense and the product
    big enough to gain (a small one would only add op calls; under torch.compile the size is
    not asked). The product then reads ``x`` once, and the weights' gradient is one GEMM too.
    Otherwise each module is projected on its own (:func:`project`). The results are column
    slices of the one output (views; the backward concatenates their gradients, one copy)."""
    if not (all(plain_linear(m) for m in mods) and x.layout == torch.strided
            and x.shape[-1] >= STACK_MIN_IN
            and all(m.weight.dtype == mods[0].weight.dtype and m.weight.shape[1] == x.shape[-1]
                    for m in mods)
            and len({m.bias is None for m in mods}) == 1
            and (_is_compiling() or x.numel() * sum(m.weight.shape[0] for m in mods) >= MIN_MACS)):
        return tuple(project(m, x) for m in mods)
    outs = [m.weight.shape[0] for m in mods]
    weight = torch.cat([m.weight for m in mods])
    bias = None if mods[0].bias is None else torch.cat([m.bias for m in mods])
    return linear_weights(x, weight, bias).split(outs, dim=-1)


def linear_weights(x: Tensor, weight: Tensor, bias) -> Tensor:
    """``F.linear(x, weight, bias)`` for weights a layer assembled itself (the keys' and
    values' in one GEMM), through ``neptune::linear`` under :func:`project`'s conditions."""
    route = _op_route(x, weight)
    if route is not None:
        return torch.ops.neptune.linear(x, weight, bias, route)
    return torch.nn.functional.linear(x, weight, bias)


def _check_linear(x, weight, bias, what):
    """The kernel's checks (csrc/linear/linear_cpu.cpp), for the fake kernel."""
    torch._check(x.dim() == 2, lambda: f"{what}: input must be 2-D [rows, in_features], got {x.dim()}-D")
    torch._check(weight.dim() == 2 and weight.shape[1] == x.shape[1],
                 lambda: f"{what}: weight must be [out_features, {x.shape[1]}], got {list(weight.shape)}")
    torch._check(x.dtype == weight.dtype and x.device == weight.device,
                 lambda: f"{what}: input and weight must share dtype and device, got {x.dtype} on "
                         f"{x.device} and {weight.dtype} on {weight.device}")
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == weight.shape[0] and bias.dtype == weight.dtype,
                     lambda: f"{what}: bias must be [{weight.shape[0]}] of the weight's dtype, got "
                             f"{list(bias.shape)} {bias.dtype}")


if _ext._C is not None and hasattr(torch.ops.neptune, "linear"):
    @torch.library.register_fake("neptune::linear")
    def _linear_fake(x, weight, bias, onednn=True):
        _check_linear(x, weight, bias, "neptune::linear")
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("neptune::linear_backward")
    def _linear_backward_fake(grad_out, x, weight, output_mask, onednn=True):
        empty = grad_out.new_empty((0,))
        return (weight.new_empty((grad_out.shape[0], weight.shape[1])) if output_mask[0] else empty,
                x.new_empty((grad_out.shape[1], x.shape[1])) if output_mask[1] else empty,
                grad_out.new_empty((grad_out.shape[1],)) if output_mask[2] else empty)
