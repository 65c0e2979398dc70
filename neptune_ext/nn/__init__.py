"""Drop-in layers: GraphAttention (for PyG's GATConv)."""
from .graph_attention import GraphAttention

__all__ = ["GraphAttention"]
