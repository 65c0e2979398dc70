"""Build neptune_ext._C: C++ CPU kernels always, CUDA kernels when possible.

Environment:
  NEPTUNE_CUDA=auto|0|1   build the CUDA sources (auto: when a CUDA torch and a real CUDA
                           toolkit, with bin/nvcc and lib64/libcudart, exist; 1: fail the
                           install with the reason when they do not)
  CUDA_HOME                the toolkit (checked, not trusted; see find_cuda_toolkit)
  TORCH_CUDA_ARCH_LIST     CUDA architectures (default "8.0;9.0")
  NEPTUNE_REQUIRE_EXT=1    fail the install if the extension does not build
                           (default: say why, record it for `neptune info`, and install
                           the pure-PyTorch package)
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "build_backend"))
from cuda_toolkit import find_cuda_toolkit, find_cutlass  # noqa: E402


BUILD_NOTE = os.path.join(ROOT, "neptune_ext", "_build_note.txt")


def _say(msg: str) -> None:
    print(f"neptune_ext: {msg}", file=sys.stderr, flush=True)


_NOTE_DIRS = [os.path.dirname(BUILD_NOTE)]  # + the build's package folder (see BuildExt)


def _record(msg: str) -> None:
    """Why the extension is missing or partial: read by `neptune info` and the import warning."""
    _say(msg)
    for d in _NOTE_DIRS:
        try:
            with open(os.path.join(d, "_build_note.txt"), "w") as f:
                f.write(msg.strip() + "\n")
        except OSError:
            pass


def _extensions():
    if os.environ.get("NEPTUNE_SKIP_EXT", "0") == "1":
        return [], {}
    mode = os.environ.get("NEPTUNE_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"NEPTUNE_CUDA must be auto, 0 or 1, got {mode!r}")
    require = os.environ.get("NEPTUNE_REQUIRE_EXT", "0") == "1" or mode == "1"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        if require:
            raise SystemExit(f"neptune_ext: torch is not importable at build time ({exc}); "
                             "install torch first, then this package")
        _record(f"not built: torch was not importable at build time ({exc}); install torch, then "
                "reinstall neptune_ext")
        return [], {}

    with_cuda, why_not = False, None
    if mode != "0":
        if torch.version.cuda is None:
            why_not = f"torch {torch.__version__} is a CPU-only build"
        else:
            home, why_not = find_cuda_toolkit(torch_guess=cpp_extension.CUDA_HOME)
            if home is not None:
                os.environ["CUDA_HOME"] = home
                cpp_extension.CUDA_HOME = home  # read by CUDAExtension and the build command
                with_cuda = True
        if mode == "1" and not with_cuda:
            raise SystemExit(f"neptune_ext: NEPTUNE_CUDA=1 but the CUDA kernels cannot be built: {why_not}")

    cpp_sources = ["csrc/neptune.cpp"] + sorted(glob.glob("csrc/*/**/*.cpp", recursive=True))
    # -fno-trapping-math: nothing here reads floating-point exception flags, and without it
    # GCC keeps a select between floating-point values (LeakyReLU, max, ...) a branch, which
    # stops the kernels' `omp simd` loops from vectorizing. Rounding is unchanged.
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math"]
    common = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])

    def make_ext(cuda: bool):
        if cuda:
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
            archs = os.environ["TORCH_CUDA_ARCH_LIST"]
            macros = [("NEPTUNE_WITH_CUDA", None),
                      # ',' not ';': build_info() is a ';'-separated key=value list
                      ("NEPTUNE_CUDA_ARCHS", '"' + ",".join(archs.replace(";", " ").split()) + '"')]
            cuda_sources = sorted(glob.glob("csrc/*/**/*_cuda.cu", recursive=True))
            include_dirs = list(common["include_dirs"])
            cutlass_inc, why_no_cutlass = find_cutlass()
            if cutlass_inc is None:
                cuda_sources = [f for f in cuda_sources if "cutlass" not in os.path.basename(f)]
                _say(f"without the CUTLASS convolution: {why_no_cutlass}")
            else:
                macros.append(("NEPTUNE_WITH_CUTLASS", None))
                include_dirs.append(cutlass_inc)
                _say(f"with the CUTLASS convolution (headers: {cutlass_inc})")
            return cpp_extension.CUDAExtension(
                "neptune_ext._C", cpp_sources + cuda_sources,
                define_macros=macros, include_dirs=include_dirs,
                extra_link_args=common["extra_link_args"],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]})
        return cpp_extension.CppExtension("neptune_ext._C", cpp_sources, extra_compile_args={"cxx": cxx},
                                          **common)

    if with_cuda:
        _say(f"building _C (CPU + CUDA, toolkit {os.environ['CUDA_HOME']})")
    else:
        _say("building _C (CPU only" + (f": {why_not})" if why_not else ", NEPTUNE_CUDA=0)"))
    cpu_only_note = None if with_cuda or mode == "0" else f"built for the CPU only: {why_not}"

    class BuildExt(cpp_extension.BuildExtension):
        def run(self):
            if not self.inplace:
                _NOTE_DIRS.append(os.path.join(self.build_lib, "neptune_ext"))
            try:
                super().run()
                _finish(cpu_only_note)
                return
            except Exception as exc:  # noqa: BLE001 - compiler or toolkit failure
                first = _cause(exc)
                if require:
                    raise SystemExit(f"neptune_ext: the extension did not build: {first}")
                if not with_cuda:
                    _record(f"not built: the C++ extension failed to compile ({first}); the package "
                            "runs its pure-PyTorch reference. Fix the compiler error or set "
                            "NEPTUNE_REQUIRE_EXT=1 to make this an install error")
                    return
                _say(f"the CUDA build failed ({first}); retrying for the CPU only")
            # CUDA failed in auto mode: the CPU-only extension.
            self.extensions = [make_ext(False)]
            try:
                super().run()
                _finish("built for the CPU only: the CUDA build failed (" + first + "); set "
                        "NEPTUNE_CUDA=1 to make that an install error")
            except Exception as exc2:  # noqa: BLE001
                _record(f"not built: the C++ extension failed to compile ({_cause(exc2)}); the "
                        "package runs its pure-PyTorch reference")

    return [make_ext(with_cuda)], {"build_ext": BuildExt.with_options(use_ninja=True)}


def _cause(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def _finish(note):
    if note:
        _record(note)
        return
    for d in _NOTE_DIRS:
        path = os.path.join(d, "_build_note.txt")
        if os.path.exists(path):
            os.remove(path)


ext_modules, cmdclass = _extensions()

# Metadata (name, version, dependencies, extras, the `neptune` script) is in pyproject.toml.
setup(ext_modules=ext_modules, cmdclass=cmdclass)
