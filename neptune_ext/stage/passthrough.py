"""The modules whose work the FusedConv2d before them does, after ``fuse_stages``: the BN
and the activation stay in the model (their type's attributes, parameters, buffers and
state-dict keys) and pass their input through; and :func:`rebuilt_as`, which makes these
(and the fused conv) from the model's own modules."""
import torch
from torch import nn

__all__ = ["FusedBatchNorm2d", "FusedReLU", "FusedReLU6", "FusedSiLU", "FusedHardswish",
           "rebuilt_as"]


def rebuilt_as(module: nn.Module, cls: type) -> nn.Module:
    """A new ``cls`` module holding ``module``'s state: the very same parameter, buffer and
    child objects under the same names, the same hooks and attributes. Its parameter, buffer
    and child dicts are its own (replacing an entry in one module leaves the other as it
    was); ``module`` itself is not changed. What ``fuse_stages`` registers in place of a
    module, so an optimizer built before fusing still trains the fused model."""
    new = cls.__new__(cls)
    state = dict(module.__dict__)
    for key in ("_parameters", "_buffers", "_modules"):
        state[key] = dict(state[key])
    state["_non_persistent_buffers_set"] = set(state.get("_non_persistent_buffers_set", ()))
    new.__dict__.update(state)
    return new


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
