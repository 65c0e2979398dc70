"""What a Stage takes from other modules' state: the state dict of an
``nn.Sequential(conv, bn, relu)`` (keys ``0.*``/``1.*``), and a conv bias, folded into the
BN's running mean (exact: it cancels under batch statistics, and ``running_mean - bias``
gives the same eval output and running-statistics updates)."""
import torch
from torch import nn

__all__ = ["load_sequential_state_dict", "bn_with_shifted_mean"]


def load_sequential_state_dict(module, state_dict, prefix, local_metadata, strict, missing_keys,
                               unexpected_keys, error_msgs):
    """A Stage's load_state_dict pre-hook: accept nn.Sequential(conv, bn, relu) keys
    (0.* -> conv.*, 1.* -> bn.*) and fold a conv bias into bn.running_mean."""
    if not any(k.startswith(prefix + "conv.") for k in state_dict):
        for old, new in (("0.", "conv."), ("1.", "bn.")):
            for key in [k for k in state_dict if k.startswith(prefix + old)]:
                state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)
    if module.conv.bias is not None:
        return
    bias = state_dict.pop(prefix + "conv.bias", None)
    rm_key = prefix + "bn.running_mean"
    if bias is not None and rm_key in state_dict:
        state_dict[rm_key] = state_dict[rm_key] - bias.to(state_dict[rm_key].dtype)


def bn_with_shifted_mean(bn: nn.BatchNorm2d, shift: torch.Tensor) -> nn.BatchNorm2d:
    """A BatchNorm2d sharing bn's affine parameters, with copies of its buffers and
    running_mean - shift."""
    new = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, affine=False,
                         track_running_stats=False)
    new.affine, new.track_running_stats = bn.affine, bn.track_running_stats
    new.weight, new.bias = bn.weight, bn.bias
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        buf = getattr(bn, name)
        new.register_buffer(name, None if buf is None else buf.detach().clone())
    if new.running_mean is not None:
        with torch.no_grad():
            new.running_mean.sub_(shift.to(new.running_mean.dtype))
    new.train(bn.training)
    return new
