"""The PEP 517 build backend: setuptools', building against the torch that will run the code.

A torch extension must be compiled against the torch it is imported with. With build
isolation (a plain ``pip install .``), pip builds in a fresh environment and would download
a second torch (gigabytes, and possibly another version) just to compile. This backend
instead finds the torch of the environment being installed into - it asks the same
interpreter with pip's isolation variables removed - and puts that torch on ``sys.path``
for the build. Only an environment without torch gets torch as a build requirement.
"""
import os
import subprocess
import sys

from setuptools import build_meta as _setuptools

__all__ = ["get_requires_for_build_wheel", "get_requires_for_build_editable",
           "get_requires_for_build_sdist", "prepare_metadata_for_build_wheel",
           "prepare_metadata_for_build_editable", "build_wheel", "build_editable", "build_sdist"]

_ISOLATION_VARS = ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME", "PYTHONSAFEPATH")


def target_torch_path():
    """The folder holding the target environment's ``torch`` package, or None."""
    env = {k: v for k, v in os.environ.items() if k not in _ISOLATION_VARS}
    code = "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))"
    try:
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           timeout=600, cwd=os.path.expanduser("~"))
    except (OSError, subprocess.SubprocessError):
        return None
    out = r.stdout.strip().splitlines()
    return out[-1] if r.returncode == 0 and out and os.path.isdir(out[-1]) else None


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        pass
    path = target_torch_path()
    if path is None:
        return False
    sys.path.append(path)  # after the build environment's own packages
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.path.remove(path)
        return False
    print(f"neptune_ext: building against the target environment's torch ({path})", file=sys.stderr)
    return True


def _requires(hook, config_settings):
    extra = [] if _torch_available() else ["torch>=2.4"]
    os.environ["NEPTUNE_SKIP_EXT"] = "1"  # listing requirements configures no extension
    try:
        return list(hook(config_settings)) + extra
    finally:
        del os.environ["NEPTUNE_SKIP_EXT"]


def get_requires_for_build_wheel(config_settings=None):
    return _requires(_setuptools.get_requires_for_build_wheel, config_settings)


def get_requires_for_build_editable(config_settings=None):
    return _requires(_setuptools.get_requires_for_build_editable, config_settings)


def get_requires_for_build_sdist(config_settings=None):
    return _setuptools.get_requires_for_build_sdist(config_settings)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    os.environ["NEPTUNE_SKIP_EXT"] = "1"  # metadata needs no compiler
    return _setuptools.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    os.environ["NEPTUNE_SKIP_EXT"] = "1"
    return _setuptools.prepare_metadata_for_build_editable(metadata_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _torch_available()
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _torch_available()
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)


def build_sdist(sdist_directory, config_settings=None):
    os.environ["NEPTUNE_SKIP_EXT"] = "1"
    return _setuptools.build_sdist(sdist_directory, config_settings)
