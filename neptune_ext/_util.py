"""Small helpers every part of the package uses (no imports from the package)."""
import os
import subprocess
import sys

import torch


def is_compiling() -> bool:
    """True while torch.compile (dynamo) traces the calling code."""
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # torch < 2.3
        return False


def check(cond: bool, msg) -> None:
    """ValueError(msg) unless cond: the package's argument checks. ``msg`` may be a
    callable returning the message (hot paths: formatted only when the check fails)."""
    if not cond:
        raise ValueError(msg() if callable(msg) else msg)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (and saved-statistics) dtype: float64 stays float64, else float32
    (the kernels' rule, csrc/common.h)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def git_commit() -> str:
    """The commit measured: NEPTUNE_GIT_COMMIT if set (a copied tree has no .git), else HEAD."""
    env = os.environ.get("NEPTUNE_GIT_COMMIT")
    if env:
        return env
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


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


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def internal_error(prog: str, exc: BaseException) -> int:
    """A command's bug as one line on stderr (exit status 1); NEPTUNE_DEBUG=1 re-raises it
    for the traceback. Call it from inside the ``except`` block."""
    if os.environ.get("NEPTUNE_DEBUG") == "1":
        raise exc
    print(f"{prog}: internal error: {type(exc).__name__}: {one_line(exc)} "
          "(set NEPTUNE_DEBUG=1 for the traceback)", file=sys.stderr)
    return 1
