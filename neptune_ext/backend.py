"""The one rule for which implementation runs: a compiled kernel or the pure-PyTorch reference.

    import neptune_ext.backend as backend
    backend.runs_kernel("gat_forward", "cuda")   # -> bool: this op's kernel runs on CUDA
    backend.kernels_run("cpu")                   # -> bool: the compiled kernels run on the CPU
    with backend.force_reference():              # every op runs its reference in the block
        ...

A kernel runs when the compiled extension is loaded (else one warning, and the reference),
``NEPTUNE_FORCE_REFERENCE`` is not ``"1"`` (benchmarks and tests compare the two paths with
it; it is read at every call), the build covers the device (``cpu``/``cuda``) and the loaded
library registers that op for it. The registrations are asked of the dispatcher once, at
import: a dispatcher query inside a traced forward breaks ``torch.compile(fullgraph=True)``.
Every op family asks here; nothing else decides. The setting is the process's (an
environment variable: every thread sees it), and code that ``torch.compile`` has already
compiled keeps the path it was compiled with (call ``torch.compiler.reset()`` after changing
it).
"""
import os
from contextlib import contextmanager

import torch

from . import _ext

# The ops whose registration decides a family's path (graph build, GAT, GATv2, BN+ReLU,
# the CUTLASS convolution, the layers' projections).
_FAMILY_OPS = ("build_csr", "gat_forward", "gat_att_forward", "gatv2_forward", "transformer_forward", "transformer_edge_forward",
              "bn_relu_forward", "conv_bias_act", "linear")
_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _ask(op: str, device_type: str) -> bool:
    if _ext._C is None or device_type not in _ext.compiled_backends():
        return False
    if not hasattr(torch.ops.neptune, op):  # a library built before the op existed
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"neptune::{op}", _KEYS[device_type])
    except (AttributeError, RuntimeError):  # an older torch without the query: trust the build
        return True


_REGISTERED = {(op, d): _ask(op, d) for op in _FAMILY_OPS for d in _KEYS}


def forced_reference() -> bool:
    """NEPTUNE_FORCE_REFERENCE=1: every op runs its reference."""
    return os.environ.get("NEPTUNE_FORCE_REFERENCE", "0") == "1"


def registered(op: str, device_type: str) -> bool:
    """Whether the loaded library has a kernel of ``neptune::<op>`` for this device type."""
    return _REGISTERED.get((op, device_type), False)


def runs_kernel(op: str, device_type) -> bool:
    """True when ``neptune::<op>``'s compiled kernel runs for tensors on ``device_type``
    (``"cpu"``, ``"cuda"`` or a ``torch.device``); ``op`` is one of the op families'."""
    if _REGISTERED.get((op, device_type), False):  # (the hot path: one lookup, one env read)
        return not forced_reference()
    if isinstance(device_type, torch.device):
        return runs_kernel(op, device_type.type)
    if op not in _FAMILY_OPS:
        raise ValueError(f"op: {op!r} is not one whose registration decides a path; "
                         f"expected one of {list(_FAMILY_OPS)}")
    if not forced_reference():
        _ext.warn_if_missing()
    return False


def kernels_run(device_type) -> bool:
    """Whether the compiled kernels run for tensors on ``device_type`` (``"cpu"``,
    ``"cuda"`` or a ``torch.device``) in this process: the build covers it, the device is
    there (CUDA) and the references are not forced."""
    device_type = torch.device(device_type).type
    if device_type == "cuda" and not torch.cuda.is_available():
        return False
    return runs_kernel("build_csr", device_type)


def compiled_backends() -> set:
    """The devices the loaded build covers: {'cpu'}, {'cpu', 'cuda'} or empty."""
    return _ext.compiled_backends()


def cutlass_built() -> bool:
    """Whether this build has the CUTLASS convolution kernels."""
    return _ext.BUILD_INFO.get("cutlass") == "1"


@contextmanager
def force_reference(on: bool = True):
    """Run the pure-PyTorch reference for every neptune op inside the block (the
    eager-layers baseline); ``on=False``: the kernels, even where the references are forced
    outside. Restores the previous setting on the way out, exceptions included."""
    old = os.environ.get("NEPTUNE_FORCE_REFERENCE")
    os.environ["NEPTUNE_FORCE_REFERENCE"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("NEPTUNE_FORCE_REFERENCE", None)
        else:
            os.environ["NEPTUNE_FORCE_REFERENCE"] = old


def cpu_cache_info() -> dict:
    """The kernels' cache of large CPU buffers (``csrc/memory/cpu_alloc.h``): ``limit`` (bytes it
    may hold while no tensor uses them; ``NEPTUNE_CPU_CACHE_MB``, default 256, 0 turns it
    off) and ``held`` (bytes it holds now). Zeros without the compiled extension."""
    op = getattr(torch.ops.neptune, "cpu_cache_info", None) if _ext._C is not None else None
    limit, held = op() if op is not None else (0, 0)
    return {"limit": int(limit), "held": int(held)}


def empty_cpu_cache() -> int:
    """Return the memory the kernels' CPU buffer cache holds to the system; the bytes
    released. Tensors in use keep theirs."""
    op = getattr(torch.ops.neptune, "cpu_cache_clear", None) if _ext._C is not None else None
    return int(op()) if op is not None else 0
