"""The paths an evaluation Stage convolution can take, and the process-wide tally of them
that ``neptune_ext.info()`` shows.

The functions that compute an evaluation convolution return the path they took with the
output (``eval.conv_bn_act_eval_with_path``); a Stage module keeps its latest one on
itself (``neptune_ext.stage_paths(model)``). The tally is telemetry about the whole process,
added to by the entry points that receive a path (the functional eval ops and the Stage
dispatch); no computation reads it. It is kept under a lock (threads may run models at
once), and nothing is added while torch.compile traces.
"""
import threading
from typing import Optional, Tuple

import torch

from .._util import is_compiling

__all__ = ["EVAL_PATHS", "EVAL_PATH_TALLY", "PathResult", "eval_path_counts",
           "reset_eval_path_counts"]

PathResult = Tuple[torch.Tensor, Optional[str]]  # (output, the name of the path that computed it)

# onednn-fused       CPU: one oneDNN primitive, conv + bias (+ residual) (+ activation)
# onednn+activation  CPU: one oneDNN primitive for conv + bias + residual, then the
#                    activation in place (oneDNN fuses only ReLU after an add)
# cutlass-fused      CUDA: conv + bias (+ residual) (+ ReLU) in one CUTLASS kernel
#                    (NEPTUNE_STAGE_CUTLASS=1; float16/bfloat16 channels_last)
# cudnn-fused        CUDA: conv + bias (+ residual) + ReLU in one cuDNN call
#                    (torch.cudnn_convolution_relu / torch.cudnn_convolution_add_relu)
# conv+bias          conv2d with its bias (+ an in-place add and activation): every other case
# autograd           under autograd (differentiable fold, conv2d, out-of-place add/activation)
EVAL_PATHS = frozenset({"onednn-fused", "onednn+activation", "cutlass-fused", "cudnn-fused",
                        "conv+bias", "autograd"})


class PathTally:
    """{path: calls} for the whole process, under a lock."""

    def __init__(self):
        self._counts = {}
        self._lock = threading.Lock()

    def add(self, path: Optional[str]) -> None:
        """Count one call of ``path`` (nothing for None, or while torch.compile traces)."""
        if path is None or is_compiling():
            return
        with self._lock:
            self._counts[path] = self._counts.get(path, 0) + 1

    def counts(self) -> dict:
        with self._lock:
            return dict(self._counts)

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()


EVAL_PATH_TALLY = PathTally()


def eval_path_counts() -> dict:
    """{path: calls} of the evaluation convolutions run so far in this process."""
    return EVAL_PATH_TALLY.counts()


def reset_eval_path_counts() -> None:
    """Start the tally of :func:`eval_path_counts` again from zero."""
    EVAL_PATH_TALLY.reset()
