"""neptune_ext: fused sparse graph attention and Conv-BN-ReLU kernels for PyTorch.

    import neptune_ext
    g = neptune_ext.Graph.from_edge_index(edge_index)
    out = neptune_ext.ops.sparse_graph_attention(h, score_src, score_dst, g)

    stage = neptune_ext.nn.Stage(3, 64, 3, padding=1)   # fused Conv2d -> BatchNorm2d -> ReLU
    model = neptune_ext.fuse_stages(torchvision.models.resnet18().eval())

This package is the library. The Neptune image classifier, its data, training and
benchmarks, and the `neptune` command are the application, in the package `neptune_app`,
which uses this one; nothing here imports it.

`neptune_ext.nn` (and `fuse_stages`, `stage_paths` from it) is loaded on first use: its
attention layers subclass PyG's `MessagePassing` when PyG is installed, so importing it
imports PyG, which `import neptune_ext` does not.
"""
import importlib

from ._version import __version__
from . import _aliases, _ext
from . import backend
from .graph import Graph
from . import ops

_aliases.install()

__all__ = ["__version__", "Graph", "ops", "nn", "fuse_stages", "stage_paths", "info", "backend"]

# name -> (module, attribute or None for the module itself), imported on first access
_LAZY = {
    "nn": (".nn", None),
    "fuse_stages": (".nn", "fuse_stages"),
    "stage_paths": (".nn", "stage_paths"),
    # `neptune_ext.info` is both a module (python -m neptune_ext.info) and callable
    # (neptune_ext.info()); imported lazily so `-m` does not import it twice.
    "info": (".info", None),
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'neptune_ext' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module, __name__)
    if attr is not None:
        value = getattr(value, attr)
        globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
