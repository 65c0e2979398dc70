"""Small helpers every part of the package uses (no imports from the package)."""
import torch


def is_compiling() -> bool:
    """True while torch.compile (dynamo) traces the calling code."""
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # torch < 2.3
        return False


def is_exporting() -> bool:
    """True while torch.export traces the calling code."""
    f = getattr(torch.compiler, "is_exporting", None)  # (torch >= 2.4)
    return bool(f()) if f is not None else False


def check(cond: bool, msg) -> None:
    """ValueError(msg) unless cond: the package's argument checks. ``msg`` may be a
    callable returning the message (hot paths: formatted only when the check fails)."""
    if not cond:
        raise ValueError(msg() if callable(msg) else msg)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (and saved-statistics) dtype: float64 stays float64, else float32
    (the kernels' rule, csrc/common.h)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def promote(*tensors):
    """The tensors (None kept) cast to their common dtype by torch's promotion rule, as a
    torch binary op would compute them: bfloat16 with float32 runs in float32. This is
    what an attention op does with a bfloat16 projection under autocast and float32
    logits or attention vectors (PyG's layers compute the same in float32)."""
    dtype = None
    for t in tensors:
        if t is not None and t.dtype != dtype:  # (promote_types is a dispatched call)
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return tuple(t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors)


def functorch_active() -> bool:
    """Whether a torch.func transform (vmap, grad, vjp, jacrev, ...) is running."""
    try:
        return torch._C._are_functorch_transforms_active()
    except AttributeError:
        return False
