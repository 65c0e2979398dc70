"""Loading the compiled extension, and the one warning when it is missing.

Set NEPTUNE_FORCE_REFERENCE=1 to run the pure-PyTorch reference even when the
extension is present (used by benchmarks and tests to compare the two paths).
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


def use_kernels(device_type: str) -> bool:
    """True when the compiled kernel for `device_type` should run; else the reference runs
    (after one warning if the extension could not be loaded at all)."""
    global _warned
    if os.environ.get("NEPTUNE_FORCE_REFERENCE", "0") == "1":
        return False
    if _C is None:
        if not _warned:
            _warned = True
            warnings.warn(
                f"neptune_ext: the compiled extension is not available ({LOAD_ERROR}); "
                "running the pure-PyTorch reference implementations (correct, but slower "
                "and with more memory). Reinstall with a C++ compiler to get the kernels.",
                RuntimeWarning, stacklevel=3)
        return False
    return device_type in _BACKENDS
