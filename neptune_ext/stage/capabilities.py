"""What the libraries of this process can run for an evaluation Stage: memoized facts about
the process (the installed torch, oneDNN and cuDNN, and this build of the extension), asked
once and kept here, in one place.

Nothing here records what a call did: the path a Stage call takes is returned to its caller
(see ``neptune_ext.stage.eval`` and ``neptune_ext.stage.dispatch``)."""
import functools
from typing import Hashable

import torch

from .. import backend as _backend

__all__ = ["onednn_fused_available", "onednn_dtypes", "cutlass_built", "CUDNN_REFUSED",
           "CUTLASS_REFUSED"]


@functools.lru_cache(maxsize=None)
def onednn_fused_available() -> bool:
    """Whether this torch exposes oneDNN's fused convolution + pointwise op and weight
    prepacking (``torch.ops.mkldnn._convolution_pointwise`` / ``_reorder_convolution_weight``)."""
    try:
        return (torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
                and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight"))
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return False


@functools.lru_cache(maxsize=None)
def onednn_dtypes() -> frozenset:
    """The dtypes oneDNN's fused convolution takes on this CPU (bfloat16 where supported)."""
    dts = {torch.float32}
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            dts.add(torch.bfloat16)
    except Exception:  # noqa: BLE001
        pass
    return frozenset(dts)


cutlass_built = _backend.cutlass_built  # whether this build has the CUTLASS convolution kernels


class LibraryRefusals:
    """The kinds of convolution a library refused once in this process (it raised for them:
    the installed library cannot run them, and will not on a later call either), so that
    later calls of a refused kind go straight to conv2d. A kind is what the library may
    refuse for one convolution and not another (dtype, layout, grouping, kernel, stride, ...):
    a refusal of a depthwise conv must not turn the fused path off for every other conv."""

    def __init__(self, library: str):
        self.library = library
        self._kinds = set()  # (set.add and `in` are atomic: safe across threads)

    def refused(self, kind: Hashable) -> bool:
        return kind in self._kinds

    def refuse(self, kind: Hashable) -> None:
        self._kinds.add(kind)

    def __repr__(self) -> str:
        return f"LibraryRefusals({self.library!r}, {len(self._kinds)} kinds)"


CUDNN_REFUSED = LibraryRefusals("cuDNN")  # torch.cudnn_convolution_relu / _add_relu
CUTLASS_REFUSED = LibraryRefusals("CUTLASS")  # neptune::conv_bias_act
