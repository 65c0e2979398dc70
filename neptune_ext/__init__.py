"""neptune_ext: fused sparse graph attention and Conv-BN-ReLU kernels for PyTorch.

    import neptune_ext
    g = neptune_ext.Graph.from_edge_index(edge_index)
    out = neptune_ext.ops.sparse_graph_attention(h, score_src, score_dst, g)
"""
from ._version import __version__
from . import _ext
from .graph import Graph
from . import nn, ops

__all__ = ["__version__", "Graph", "nn", "ops", "info"]


def __getattr__(name):
    # `neptune_ext.info` is both a module (python -m neptune_ext.info) and callable
    # (neptune_ext.info()); imported lazily so `-m` does not import it twice.
    if name == "info":
        import importlib
        return importlib.import_module(".info", __name__)
    raise AttributeError(f"module 'neptune_ext' has no attribute {name!r}")
