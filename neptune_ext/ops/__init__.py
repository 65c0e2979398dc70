"""Functional ops: validation, autograd, fake kernels, dispatch to _C or the reference."""
from .gatv2 import gatv2_attention, gatv2_attention_weights
from .graph_attention import attention_weights, sparse_graph_attention
from .transformer import transformer_attention, transformer_attention_weights
from .stage import bn_relu, conv_bias_relu, conv_bn_relu_train, fold_conv_bn, update_running_stats

__all__ = ["sparse_graph_attention", "attention_weights", "gatv2_attention", "gatv2_attention_weights",
           "transformer_attention", "transformer_attention_weights",
           "bn_relu", "conv_bn_relu_train",
           "update_running_stats", "fold_conv_bn", "conv_bias_relu"]
