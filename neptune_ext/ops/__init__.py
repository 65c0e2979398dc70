"""Functional ops: validation, autograd, fake kernels, dispatch to _C or the reference."""
from .graph_attention import attention_weights, sparse_graph_attention

__all__ = ["sparse_graph_attention", "attention_weights"]
