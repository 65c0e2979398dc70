"""The CUTLASS implicit-GEMM convolution ``neptune::conv_bias_act`` (csrc/stage/conv_cutlass*.cu):
when an evaluation Stage takes it, the call, and its fake kernel (for torch.compile).

Opt-in with ``NEPTUNE_STAGE_CUTLASS=1`` until a GPU run has measured it against cuDNN's
fused calls; builds without CUTLASS never take it."""
import os

import torch

from .. import _ext
from .capabilities import CUTLASS_REFUSED, cutlass_built
from .checks import conv_output_shape

__all__ = ["cutlass_enabled", "cutlass_eligible", "cutlass_fused"]


def cutlass_enabled() -> bool:
    """Whether evaluation Stages take the CUTLASS convolution where eligible (asked at every
    call: ``NEPTUNE_STAGE_CUTLASS=1`` in a built extension)."""
    return os.environ.get("NEPTUNE_STAGE_CUTLASS", "0") == "1" and cutlass_built()


def cutlass_eligible(input, weight, residual, activation, groups, d) -> bool:
    """What the instantiated kernels take: float16/bfloat16 channels_last input, groups 1,
    no dilation, channel counts that are multiples of 8 (128-bit accesses), ReLU or no
    activation (a residual only with ReLU)."""
    return (input.dtype in (torch.float16, torch.bfloat16) and groups == 1 and tuple(d) == (1, 1)
            and input.is_contiguous(memory_format=torch.channels_last)
            and input.shape[1] % 8 == 0 and weight.shape[0] % 8 == 0
            and (activation == "relu" or (activation == "none" and residual is None)))


def cutlass_fused(input, weight, bias, residual, s, p, d, groups, activation):
    """conv + bias (+ residual) (+ ReLU) as one CUTLASS kernel, or None where not taken."""
    if not (cutlass_enabled() and cutlass_eligible(input, weight, residual, activation, groups, d)):
        return None
    kind = (input.dtype, tuple(weight.shape[1:]), tuple(s), residual is None, activation)
    if CUTLASS_REFUSED.refused(kind):
        return None
    try:
        return torch.ops.neptune.conv_bias_act(input, weight, bias, residual, list(s), list(p),
                                               list(d), 1 if activation == "relu" else 0)
    except RuntimeError:
        CUTLASS_REFUSED.refuse(kind)
        return None


def _register_fake():
    @torch.library.register_fake("neptune::conv_bias_act")
    def _conv_bias_act_fake(input, weight, bias, residual, stride, padding, dilation, activation):
        shape = conv_output_shape(input, weight, stride, padding, dilation)
        return input.new_empty(shape).contiguous(memory_format=torch.channels_last)


if _ext._C is not None:
    _register_fake()
