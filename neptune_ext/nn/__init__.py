"""Drop-in layers: GraphAttention (for PyG's GATConv), GraphAttentionV2 (for GATv2Conv),
GraphTransformer (for TransformerConv),
Stage (fused Conv2d -> BatchNorm2d -> ReLU) and fuse_stages(model): the public face of
the layers of ``neptune_ext.attention`` and the modules of ``neptune_ext.stage`` (this module
only re-exports them)."""
from ..attention.gatv2_layer import GraphAttentionV2
from ..attention.gat_layer import GraphAttention
from ..attention.transformer_layer import GraphTransformer
from ..stage.module import Stage, stage_paths
from ..stage.fuse.model import fuse_stages

__all__ = ["GraphAttention", "GraphAttentionV2", "GraphTransformer", "Stage", "fuse_stages", "stage_paths"]
