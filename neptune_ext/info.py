"""`python -m neptune_ext.info`: what was built and what will run."""
import json
import sys
import types

import torch

from . import _ext
from ._version import __version__


def info_dict() -> dict:
    build = _ext._build_info()
    return {
        "neptune_ext": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "extension_loaded": _ext._C is not None,
        "extension_error": _ext.why_missing(),
        "build_note": _ext.build_note(),
        "compiled_backends": sorted(_ext.compiled_backends()),
        "cuda_archs": build.get("cuda_archs", "").split(",") if build.get("cuda") == "1" else [],
        "openmp": build.get("openmp") == "1",
        "cutlass_conv": _cutlass_state(),
        "num_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "stage_eval_paths": _stage_eval_path_counts(),
    }


def _cutlass_state() -> str:
    """The CUTLASS convolution: not built / built, off (NEPTUNE_STAGE_CUTLASS=1 turns it on)
    / on (as the evaluation Stages decide: stage/cutlass.py)."""
    from .stage.capabilities import cutlass_built
    from .stage.cutlass import cutlass_enabled
    if not cutlass_built():
        return "not built"
    return "on" if cutlass_enabled() else "built, off (NEPTUNE_STAGE_CUTLASS=1)"


def _stage_eval_path_counts() -> dict:
    """How many evaluation convolutions of Stages ran on each path so far (see
    neptune_ext.stage.paths): which one a model's Stages take on this machine.
    (``neptune_ext.stage_paths(model)`` is another thing: each module's latest path.)"""
    from .stage.paths import eval_path_counts
    return eval_path_counts()


def info(file=None) -> dict:
    """Print (and return) version, torch version, compiled backends and threads."""
    d = info_dict()
    out = file or sys.stdout
    width = max(len(k) for k in d)
    for k, v in d.items():
        if isinstance(v, list):
            v = ", ".join(v) if v else "-"
        elif isinstance(v, dict):
            v = ", ".join(f"{p}: {n}" for p, n in v.items()) if v else "-"
        print(f"{k:<{width}}  {v}", file=out)
    return d


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--json" in argv:
        print(json.dumps(info_dict(), indent=2))
    else:
        info()


class _CallableModule(types.ModuleType):
    """Lets `neptune_ext.info()` call :func:`info` while `neptune_ext.info` stays a module."""

    def __call__(self, file=None):
        return info(file)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    main()
