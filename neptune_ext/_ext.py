"""Loading the compiled extension, and the one warning when it is missing.

Which implementation runs (a kernel or the reference, NEPTUNE_FORCE_REFERENCE) is decided
in one place, :mod:`neptune_ext.backend`.
"""
import os
import warnings

import torch  # loads libc10/libtorch before the extension

_C = None
LOAD_ERROR = None
try:
    from . import _C  # noqa: F401  (registers torch.ops.neptune.*)
except ImportError as exc:  # not built, or built against another torch
    LOAD_ERROR = exc

_warned = False
_HERE = os.path.dirname(os.path.abspath(__file__))


def build_note():
    """What the build recorded about a missing or CPU-only extension (None if nothing)."""
    try:
        with open(os.path.join(_HERE, "_build_note.txt")) as f:
            return f.read().strip() or None
    except OSError:
        return None


def why_missing():
    """Why the compiled extension is not loaded, in one sentence (None when it is)."""
    if _C is not None:
        return None
    import glob
    built = glob.glob(os.path.join(_HERE, "_C*.so")) + glob.glob(os.path.join(_HERE, "_C*.pyd"))
    if built:
        return (f"{os.path.basename(built[0])} exists but cannot be loaded ({LOAD_ERROR}); it was "
                f"probably built against another torch than {torch.__version__}: reinstall neptune_ext")
    note = build_note()
    if note:
        return note
    return ("the extension was never built here (no _C library, no build record): installed with "
            "NEPTUNE_SKIP_EXT=1 or from an unbuilt source tree; run `make build` or "
            "`pip install --no-build-isolation .`")


def _parse_build_info():
    if _C is None:
        return {}
    return dict(item.split("=", 1) for item in torch.ops.neptune.build_info().split(";"))


BUILD_INFO = _parse_build_info()
_BACKENDS = frozenset(d for d in ("cpu", "cuda") if BUILD_INFO.get(d) == "1")


def _build_info():
    return dict(BUILD_INFO)


def compiled_backends():
    """The set of devices the compiled kernels cover: {'cpu'}, {'cpu', 'cuda'} or empty."""
    return set(_BACKENDS)


def warn_if_missing() -> None:
    """One RuntimeWarning per process when the compiled extension could not be loaded (the
    references then run everywhere). Which implementation runs is decided by
    :mod:`neptune_ext.backend`, not here."""
    global _warned
    if _C is None and not _warned:
        _warned = True
        warnings.warn(
            f"neptune_ext: the compiled extension is not available: {why_missing()} - "
            "running the pure-PyTorch reference implementations (correct, but slower "
            "and with more memory). `neptune info` says more.",
            RuntimeWarning, stacklevel=3)
