"""Small helpers every part of the package uses (no imports from the package)."""
import torch


def is_compiling() -> bool:
    """True while torch.compile (dynamo) traces the calling code."""
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # torch < 2.3
        return False


def check(cond: bool, msg: str) -> None:
    """ValueError(msg) unless cond: the package's argument checks."""
    if not cond:
        raise ValueError(msg)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (and saved-statistics) dtype: float64 stays float64, else float32
    (the kernels' rule, csrc/common.h)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
