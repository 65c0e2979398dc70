"""Drop-in layers: GraphAttention (for PyG's GATConv), Stage (fused Conv2d -> BatchNorm2d
-> ReLU) and fuse_stages(model)."""
from .graph_attention import GraphAttention
from .stage import Stage
from .fuse import fuse_stages

__all__ = ["GraphAttention", "Stage", "fuse_stages"]
