"""Finding a real CUDA toolkit for the build (used by setup.py; no imports beyond the stdlib).

A toolkit is a folder with bin/nvcc *and* the CUDA runtime library (lib64/libcudart.so*):
a folder that merely holds an `nvcc` (a wrapper script in /usr/local/bin, say) is not one,
so torch's guess of CUDA_HOME from the nvcc on PATH is checked, never trusted.
"""
import glob
import os
import re
import shutil

_LIB_DIRS = ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"),
             os.path.join("targets", "sbsa-linux", "lib"))


def is_toolkit(home: str):
    """None if ``home`` is a usable toolkit, else what is missing."""
    if not os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return "no bin/nvcc"
    if not any(glob.glob(os.path.join(home, d, "libcudart.so*")) for d in _LIB_DIRS):
        return "no lib64/libcudart.so"
    return None


def _real_nvcc_home(nvcc: str):
    """The toolkit folder behind an nvcc on PATH, following symlinks and `exec` wrappers."""
    real = os.path.realpath(nvcc)
    try:
        with open(real, "rb") as f:
            head = f.read(4096).decode("utf-8", "replace")
        m = re.search(r"exec\s+(\S*nvcc)\b", head) if head.startswith("#!") else None
        if m:
            real = os.path.realpath(m.group(1))
    except OSError:
        pass
    return os.path.dirname(os.path.dirname(real))


def find_cuda_toolkit(environ=None, torch_guess=None, defaults=("/usr/local/cuda",)):
    """(home, None) for a usable toolkit, else (None, why).

    An explicit CUDA_HOME (or CUDA_PATH) is the only candidate: the user chose it. Otherwise
    the candidates are the toolkit behind the nvcc on PATH (through wrapper scripts), torch's
    guess, and ``defaults``."""
    env = os.environ if environ is None else environ
    explicit = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    if explicit:
        why = is_toolkit(explicit)
        if why is None:
            return explicit, None
        var = "CUDA_HOME" if env.get("CUDA_HOME") else "CUDA_PATH"
        return None, (f"{var}={explicit} is not a CUDA toolkit ({why}); point it at a toolkit "
                      "with bin/nvcc and lib64/libcudart.so")
    cands, rejected = [], []
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    if nvcc:
        cands.append(_real_nvcc_home(nvcc))
    cands += [torch_guess, *defaults]
    seen = set()
    for home in cands:
        if not home or home in seen:
            continue
        seen.add(home)
        why = is_toolkit(home)
        if why is None:
            return home, None
        rejected.append(f"{home} ({why})")
    return None, ("no CUDA toolkit found" + (" (tried " + ", ".join(rejected) + ")" if rejected else "")
                  + "; set CUDA_HOME to a toolkit with bin/nvcc and lib64/libcudart.so")


def find_cutlass(environ=None):
    """(include dir, None) of NVIDIA's CUTLASS/CuTe headers, or (None, why not).

    NEPTUNE_CUTLASS_DIR names an include dir (the one holding cutlass/cutlass.h); otherwise
    the headers the nvidia-cutlass package ships (cutlass_library/source/include), found
    without importing it. NEPTUNE_CUTLASS=0 leaves the CUTLASS kernels out."""
    env = os.environ if environ is None else environ
    if env.get("NEPTUNE_CUTLASS", "auto").lower() == "0":
        return None, "NEPTUNE_CUTLASS=0"
    candidates = []
    if env.get("NEPTUNE_CUTLASS_DIR"):
        candidates.append(env["NEPTUNE_CUTLASS_DIR"])
        if not os.path.isfile(os.path.join(env["NEPTUNE_CUTLASS_DIR"], "cutlass", "cutlass.h")):
            return None, f"NEPTUNE_CUTLASS_DIR={env['NEPTUNE_CUTLASS_DIR']} holds no cutlass/cutlass.h"
    import importlib.util
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.append(os.path.join(loc, "source", "include"))
    for inc in candidates:
        if os.path.isfile(os.path.join(inc, "cutlass", "conv", "kernel", "default_conv2d_fprop_with_broadcast.h")):
            return inc, None
    return None, ("the CUTLASS headers were not found (pip install nvidia-cutlass, or set "
                  "NEPTUNE_CUTLASS_DIR)")
