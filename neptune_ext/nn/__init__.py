"""Drop-in layers: GraphAttention (for PyG's GATConv), GraphAttentionV2 (for GATv2Conv),
GraphTransformer (for TransformerConv),
Stage (fused Conv2d -> BatchNorm2d -> ReLU) and fuse_stages(model)."""
from .gatv2 import GraphAttentionV2
from .graph_attention import GraphAttention
from .transformer import GraphTransformer
from .stage import Stage, stage_paths
from .fuse import fuse_stages

__all__ = ["GraphAttention", "GraphAttentionV2", "GraphTransformer", "Stage", "fuse_stages", "stage_paths"]
