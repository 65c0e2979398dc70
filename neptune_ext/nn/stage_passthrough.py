"""The modules whose work the FusedConv2d before them does, after ``fuse_stages``: the BN
and the activation stay in the model (their type's attributes, parameters, buffers and
state-dict keys) and pass their input through."""
import torch
from torch import nn

__all__ = ["FusedBatchNorm2d", "FusedReLU", "FusedReLU6", "FusedSiLU", "FusedHardswish"]


class FusedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d whose work the :class:`FusedConv2d` before it does: it keeps its
    parameters and buffers (and state-dict keys) and passes its input through."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input


class _PassThrough:
    """An activation module whose work the :class:`FusedConv2d` before it does: it keeps its
    type's attributes and passes its input through. (One named subclass per activation type,
    so fused models pickle.)"""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input


class FusedReLU(_PassThrough, nn.ReLU):
    """A ReLU applied by the :class:`FusedConv2d` before it: passes its input through."""


class FusedReLU6(_PassThrough, nn.ReLU6):
    """A ReLU6 applied by the :class:`FusedConv2d` before it: passes its input through."""


class FusedSiLU(_PassThrough, nn.SiLU):
    """A SiLU applied by the :class:`FusedConv2d` before it: passes its input through."""


class FusedHardswish(_PassThrough, nn.Hardswish):
    """A Hardswish applied by the :class:`FusedConv2d` before it: passes its input through."""
