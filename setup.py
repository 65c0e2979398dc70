"""Build neptune_ext._C: C++ CPU kernels always, CUDA kernels when possible.

Environment:
  NEPTUNE_CUDA=auto|0|1   build the CUDA sources (auto: when nvcc and a CUDA torch exist)
  TORCH_CUDA_ARCH_LIST     CUDA architectures (default "8.0;9.0")
  NEPTUNE_REQUIRE_EXT=1    fail the install if the extension does not build
                           (default: warn and install the pure-PyTorch package)
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _read_version():
    ns = {}
    with open(os.path.join(ROOT, "neptune_ext", "_version.py")) as f:
        exec(f.read(), ns)
    return ns["__version__"]


def _extensions():
    if os.environ.get("NEPTUNE_SKIP_EXT", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("neptune_ext: torch is not importable at build time; installing without _C",
              file=sys.stderr)
        return [], {}

    mode = os.environ.get("NEPTUNE_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"NEPTUNE_CUDA must be auto, 0 or 1, got {mode!r}")
    has_cuda_toolkit = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    if mode == "1" and not has_cuda_toolkit:
        raise SystemExit("NEPTUNE_CUDA=1 but nvcc (CUDA_HOME) or a CUDA build of torch is missing")
    with_cuda = has_cuda_toolkit and mode != "0"

    cpp_sources = ["csrc/neptune.cpp"] + sorted(glob.glob("csrc/*/*.cpp"))
    cxx = ["-O3", "-fopenmp"]
    define_macros = []
    extra = {"cxx": cxx}
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        cuda_sources = sorted(glob.glob("csrc/*/*_cuda.cu"))
        define_macros += [("NEPTUNE_WITH_CUDA", None),
                          # ',' not ';': build_info() is a ';'-separated key=value list
                          ("NEPTUNE_CUDA_ARCHS", '"' + ",".join(archs.replace(";", " ").split()) + '"')]
        extra["nvcc"] = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        ext = cpp_extension.CUDAExtension(
            "neptune_ext._C", cpp_sources + cuda_sources, include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros, extra_compile_args=extra, extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension(
            "neptune_ext._C", cpp_sources, include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros, extra_compile_args=extra, extra_link_args=["-fopenmp"])
    print(f"neptune_ext: building _C ({'CPU + CUDA' if with_cuda else 'CPU only'})", file=sys.stderr)

    class BuildExt(cpp_extension.BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as exc:  # no compiler, broken toolchain, ...
                if os.environ.get("NEPTUNE_REQUIRE_EXT", "0") == "1":
                    raise
                print(f"neptune_ext: WARNING: the C++/CUDA extension did not build ({exc}); "
                      "the package will run its pure-PyTorch reference", file=sys.stderr)

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="neptune_ext",
    version=_read_version(),
    description="Fused sparse graph attention and Conv-BN-ReLU kernels for PyTorch",
    packages=find_packages(include=["neptune_ext", "neptune_ext.*"]),
    package_data={"neptune_ext": ["data/*.npz"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "cli": ["tqdm", "matplotlib", "pillow", "torchvision"],
        "test": ["pytest", "expecttest", "torch_geometric", "torchvision", "scikit-learn"],
    },
    entry_points={"console_scripts": ["neptune=neptune_ext.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
