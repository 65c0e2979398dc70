"""Stage (Conv2d -> BatchNorm2d -> ReLU): validation, autograd, fake kernels, dispatch.

Training (batch statistics):

    x = conv2d(input, conv_weight)                      ATen / oneDNN
    y, mean, var = bn_relu(x, bn_weight, bn_bias, eps)  torch.ops.neptune.bn_relu_forward

The backward of BN+ReLU needs x everywhere, also where y = 0:
``grad_x = w * invstd * (dz - mean(dz) - x_hat * mean(dz * x_hat))`` is not zero
there, and x_hat cannot be recovered from y = 0. :func:`conv_bn_relu_train`
therefore saves only the convolution's *input* (which the convolution's own
backward needs anyway, and which in a stack of Stages is the previous Stage's
output) and recomputes x in backward: one extra convolution forward per Stage in
exchange for not storing x — about half the activation memory of eager.

Evaluation (running statistics): BN is folded into the convolution's weight and
bias (:func:`fold_conv_bn`, cached by :class:`FoldCache`) and
:func:`conv_bias_relu` runs convolution + bias + ReLU in one oneDNN primitive
(fused ReLU post-op on prepacked weights) where the installed torch exposes it.

Without the compiled extension (or for devices it has no Stage kernel for) the
pure-PyTorch reference in ``neptune_ext.stage.reference`` runs instead.
"""
from .bn_relu import bn_relu
from .fold_cache import FoldCache, PackCache, fold_conv_bn, pack_conv_weight
from .activations import ACTIVATIONS, apply_activation, check_activation
from .capabilities import onednn_fused_available
from .checks import conv_output_shape
from .eval import conv_bias, conv_bias_relu, conv_bn_act_eval
from .train import conv_bn_act_train, conv_bn_relu_train, update_running_stats

__all__ = ["bn_relu", "conv_bn_relu_train", "conv_bn_act_train", "conv_output_shape",
           "update_running_stats", "fold_conv_bn",
           "conv_bn_act_eval", "conv_bias_relu", "conv_bias", "pack_conv_weight", "FoldCache",
           "PackCache", "onednn_fused_available", "ACTIVATIONS", "check_activation",
           "apply_activation"]
