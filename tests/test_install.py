"""Installing: a real CUDA toolkit is found or the reason is said; a plain `pip install .`
builds against the target environment's torch; `neptune info` says why kernels are missing."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "build_backend"))
from cuda_toolkit import find_cuda_toolkit, find_cutlass, is_toolkit  # noqa: E402


def _toolkit(root, nvcc=True, cudart=True):
    os.makedirs(os.path.join(root, "bin"), exist_ok=True)
    os.makedirs(os.path.join(root, "lib64"), exist_ok=True)
    if nvcc:
        open(os.path.join(root, "bin", "nvcc"), "w").close()
    if cudart:
        open(os.path.join(root, "lib64", "libcudart.so.13"), "w").close()
    return str(root)


def test_a_folder_with_nvcc_but_no_runtime_is_not_a_toolkit(tmp_path):
    assert is_toolkit(_toolkit(tmp_path / "good")) is None
    assert is_toolkit(_toolkit(tmp_path / "wrapper_dir", cudart=False)) == "no lib64/libcudart.so"
    assert is_toolkit(_toolkit(tmp_path / "empty", nvcc=False)) == "no bin/nvcc"


def test_an_explicit_cuda_home_is_checked_and_reported(tmp_path):
    bad = _toolkit(tmp_path / "bad", cudart=False)
    home, why = find_cuda_toolkit({"CUDA_HOME": bad, "PATH": ""}, defaults=())
    assert home is None and f"CUDA_HOME={bad} is not a CUDA toolkit (no lib64/libcudart.so)" in why
    good = _toolkit(tmp_path / "good")
    assert find_cuda_toolkit({"CUDA_HOME": good, "PATH": ""}, defaults=()) == (good, None)


def test_a_wrapper_nvcc_on_path_leads_to_the_real_toolkit(tmp_path):
    real = _toolkit(tmp_path / "cuda-13.0")
    wrapper_bin = tmp_path / "local" / "bin"
    wrapper_bin.mkdir(parents=True)
    nvcc = wrapper_bin / "nvcc"
    nvcc.write_text(f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    nvcc.chmod(0o755)
    guessed = str(tmp_path / "local")  # what torch guesses: the wrapper's parent
    home, why = find_cuda_toolkit({"PATH": str(wrapper_bin)}, torch_guess=guessed, defaults=())
    assert home == real, why
    home, why = find_cuda_toolkit({"PATH": ""}, torch_guess=guessed, defaults=())
    assert home is None and "no lib64/libcudart.so" in why and guessed in why


def _fresh_venv(path):
    """A venv that sees this environment's torch (a .pth file), but not neptune_ext."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    py = os.path.join(path, "bin", "python")
    site = subprocess.run([py, "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    import torch
    with open(os.path.join(site, "outer_torch.pth"), "w") as f:
        f.write(os.path.dirname(os.path.dirname(torch.__file__)) + "\n")
    return py


def _copy_tree(src):
    """A clone of this checkout with its working tree as it is (uncommitted changes included),
    without build outputs."""
    subprocess.run(["git", "clone", "-q", ROOT, str(src)], check=True)
    for rel in ("setup.py", "pyproject.toml", "MANIFEST.in", "build_backend", "neptune_ext", "neptune_app",
                "csrc"):
        s, d = os.path.join(ROOT, rel), os.path.join(src, rel)
        if os.path.isdir(s):
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(s, d, ignore=shutil.ignore_patterns("*.so", "__pycache__", ".built",
                                                                "_build_note.txt"))
        else:
            shutil.copy(s, d)


def _env(**kw):
    # no PYTHONPATH: a checkout on it would shadow the copy installed into the fresh venv
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEPTUNE_") and k != "PYTHONPATH"}
    env.update(kw)
    return env


@pytest.mark.slow
def test_pip_install_isolated_builds_against_the_target_torch_and_says_why_cpu_only(tmp_path):
    if shutil.which("c++") is None:
        pytest.skip("needs a C++ compiler")
    # Build isolation installs setuptools, wheel and ninja into the build environment.
    probe = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d",
                            str(tmp_path / "probe"), "setuptools>=77", "wheel", "ninja"],
                           capture_output=True, text=True, timeout=600)
    if probe.returncode != 0:
        pytest.skip("no package index reachable for an isolated build: " + probe.stderr[-300:])
    src = tmp_path / "src"
    _copy_tree(src)
    py = _fresh_venv(tmp_path / "venv")
    pip = [py, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "-q", str(src)]

    # CUDA requested explicitly with a broken toolkit: the install fails, saying why.
    r = subprocess.run(pip, env=_env(NEPTUNE_CUDA="1", CUDA_HOME=str(tmp_path / "nope")),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode != 0
    assert "NEPTUNE_CUDA=1 but the CUDA kernels cannot be built" in r.stdout + r.stderr
    assert "is not a CUDA toolkit (no bin/nvcc)" in r.stdout + r.stderr

    # Automatic mode, same broken toolkit: a CPU-only build, and the reason is kept. Build
    # isolation is on (plain `pip install`): no second torch may be fetched for the build.
    r = subprocess.run(pip[:-2] + ["-v", str(src)], env=_env(CUDA_HOME=str(tmp_path / "nope"), MAX_JOBS="2"),
                       capture_output=True, text=True, timeout=1800)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert "building against the target environment's torch" in log
    assert "Collecting torch" not in log and "Downloading torch" not in log
    info = subprocess.run([py, "-m", "neptune_ext.info", "--json"], capture_output=True, text=True,
                          cwd=str(tmp_path), env=_env(), timeout=300)
    assert info.returncode == 0, info.stderr
    import json
    d = json.loads(info.stdout)
    assert d["extension_loaded"] and d["compiled_backends"] == ["cpu"]
    assert "built for the CPU only" in d["build_note"] and "not a CUDA toolkit" in d["build_note"]
    # the application is installed beside the library, with its embedded data set and the script
    app = subprocess.run([py, "-c", "import importlib.resources as r, neptune_app.cli; "
                          "assert (r.files('neptune_app') / 'data' / 'digits.npz').is_file()"],
                         capture_output=True, text=True, cwd=str(tmp_path), env=_env(), timeout=300)
    assert app.returncode == 0, app.stderr
    version = subprocess.run([os.path.join(os.path.dirname(py), "neptune"), "--version"], capture_output=True,
                             text=True, cwd=str(tmp_path), env=_env(), timeout=300)
    assert version.returncode == 0 and version.stdout.startswith("neptune_ext "), version.stdout + version.stderr


@pytest.mark.slow
def test_pip_install_with_a_usable_toolkit_builds_the_cuda_kernels(tmp_path):
    import torch
    home, why = find_cuda_toolkit()
    if home is None or torch.version.cuda is None or shutil.which("c++") is None:
        pytest.skip(f"no usable CUDA toolkit or CUDA torch here ({why})")
    src = tmp_path / "src"
    _copy_tree(src)
    py = _fresh_venv(tmp_path / "venv")
    # Without the CUTLASS kernels (NEPTUNE_CUTLASS=0: the build a machine without the headers
    # gets; `make build` covers the build with them).
    r = subprocess.run([py, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "-q", str(src)],
                       env=_env(MAX_JOBS="2", TORCH_CUDA_ARCH_LIST="9.0", NEPTUNE_CUTLASS="0"),
                       capture_output=True, text=True, timeout=2400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    info = subprocess.run([py, "-m", "neptune_ext.info", "--json"], capture_output=True, text=True,
                          cwd=str(tmp_path), env=_env(), timeout=300)
    import json
    d = json.loads(info.stdout)
    assert d["compiled_backends"] == ["cpu", "cuda"] and d["build_note"] is None, d
    assert d["cutlass_conv"] == "not built", d


def test_info_says_why_the_extension_is_missing(tmp_path):
    pkg = tmp_path / "neptune_ext"
    shutil.copytree(os.path.join(ROOT, "neptune_ext"), pkg,
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "_build_note.txt"))
    code = "import neptune_ext._ext as e; print(e.why_missing())"
    import torch
    # -S: no site processing, so this environment's editable install cannot shadow the copy.
    path = os.pathsep.join([str(tmp_path), os.path.dirname(os.path.dirname(torch.__file__))])

    def why():
        r = subprocess.run([sys.executable, "-S", "-c", code], cwd=str(tmp_path), capture_output=True,
                           text=True, env=_env(PYTHONPATH=path))
        return r.stdout + r.stderr

    assert "never built here" in why()
    (pkg / "_build_note.txt").write_text("not built: the C++ extension failed to compile (boom)\n")
    assert "failed to compile (boom)" in why()
    import sysconfig
    (pkg / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))).write_text("not a library")
    out = why()
    assert "exists but cannot be loaded" in out and "circular import" not in out, out


def test_cutlass_headers_are_found_or_the_reason_is_said(tmp_path):
    assert find_cutlass({"NEPTUNE_CUTLASS": "0"}) == (None, "NEPTUNE_CUTLASS=0")
    inc, why = find_cutlass({"NEPTUNE_CUTLASS_DIR": str(tmp_path)})
    assert inc is None and "holds no cutlass/cutlass.h" in why
    fake = tmp_path / "include"
    (fake / "cutlass" / "conv" / "kernel").mkdir(parents=True)
    (fake / "cutlass" / "cutlass.h").write_text("")
    (fake / "cutlass" / "conv" / "kernel" / "default_conv2d_fprop_with_broadcast.h").write_text("")
    assert find_cutlass({"NEPTUNE_CUTLASS_DIR": str(fake)}) == (str(fake), None)
    inc, why = find_cutlass({})  # the pinned package `make` installs, or the reason
    assert (inc is None) != (why is None)
    if inc is not None:
        assert os.path.isfile(os.path.join(inc, "cutlass", "conv", "device", "implicit_gemm_convolution.h"))
