"""neptune_ext: fused sparse graph attention and Conv-BN-ReLU kernels for PyTorch.

    import neptune_ext
    g = neptune_ext.Graph.from_edge_index(edge_index)
    out = neptune_ext.ops.sparse_graph_attention(h, score_src, score_dst, g)

    stage = neptune_ext.nn.Stage(3, 64, 3, padding=1)   # fused Conv2d -> BatchNorm2d -> ReLU
    model = neptune_ext.fuse_stages(torchvision.models.resnet18().eval())
"""
from ._version import __version__
from . import _ext
from .graph import Graph
from . import ops
from . import nn
from .nn import fuse_stages, stage_paths

__all__ = ["__version__", "Graph", "ops", "nn", "fuse_stages", "stage_paths", "info"]


def __getattr__(name):
    # `neptune_ext.info` is both a module (python -m neptune_ext.info) and callable
    # (neptune_ext.info()); imported lazily so `-m` does not import it twice.
    if name == "info":
        import importlib
        return importlib.import_module(".info", __name__)
    raise AttributeError(f"module 'neptune_ext' has no attribute {name!r}")
