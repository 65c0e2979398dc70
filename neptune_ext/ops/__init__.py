"""Functional ops: the public face of the ops of ``neptune_ext.attention`` (sparse graph
attention, GATv2, graph transformer) and ``neptune_ext.stage`` (the Stage's BN+ReLU, train
and eval convolutions, the BN fold). Each validates its arguments, registers its fake
kernel and autograd, and dispatches to the extension or the pure-PyTorch reference; this
module only re-exports them."""
from ..attention.gatv2 import gatv2_attention, gatv2_attention_weights
from ..attention.gat import attention_weights, sparse_graph_attention
from ..attention.transformer import transformer_attention, transformer_attention_weights, transformer_edge_attention
from ..stage.functional import bn_relu, conv_bias_relu, conv_bn_relu_train, fold_conv_bn, update_running_stats
from ..attention import projection as _projection  # noqa: F401  (neptune::linear's fake kernels)

__all__ = ["sparse_graph_attention", "attention_weights", "gatv2_attention", "gatv2_attention_weights",
           "transformer_attention", "transformer_attention_weights", "transformer_edge_attention",
           "bn_relu", "conv_bn_relu_train",
           "update_running_stats", "fold_conv_bn", "conv_bias_relu"]
