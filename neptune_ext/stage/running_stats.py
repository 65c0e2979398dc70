"""A Stage's running statistics (batch-statistics mode), updated as nn.BatchNorm2d.forward
updates them: ``num_batches_tracked``, the momentum (or the cumulative average for
momentum=None), the unbiased variance, a conv bias added back into the mean."""
import torch
from torch import nn

from .train import update_running_stats

__all__ = ["with_running_stats"]


def with_running_stats(conv: nn.Conv2d, bn: nn.BatchNorm2d, run) -> torch.Tensor:
    """``run(bn.weight, bn.bias) -> (y, mean, var)``, then the running statistics updated as
    nn.BatchNorm2d.forward updates them."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    y, mean, var = run(bn.weight, bn.bias)
    if not bn.training or bn.track_running_stats:
        if conv.bias is not None:  # cancels in the output, not in the running mean
            mean = mean + conv.bias.detach()
        update_running_stats(bn.running_mean, bn.running_var, mean, var,
                             y.numel() // y.shape[1], factor)
    return y
