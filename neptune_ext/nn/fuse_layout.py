"""The caller's memory format around a fused model on the CPU.

oneDNN runs a convolution fastest on channels_last (NHWC) tensors with a weight packed once;
fed NCHW it reorders the activations in and out of every convolution. So while a model
fused by ``fuse_stages`` is called with NCHW input, the first fused eval convolution that
gets an NCHW float32/bfloat16 tensor converts it to channels_last (one copy) and every
layer after it keeps channels_last (torch's pooling, adds and activations preserve it);
when the model returns after such a conversion, every 4-D channels_last tensor in its output
(through tuples, lists and dicts) goes back to NCHW (contiguous), so the caller gets what the
original returns, in the original's memory format. (A model that itself returns a
channels_last feature map for NCHW input would get it back in NCHW: not seen in practice.)

Between the layers the model's own code then sees channels_last tensors (equal values,
other strides). Code for which that matters the way that fails loudly (``x.view(n, -1)``
on a feature map) raises a RuntimeError: the call is then run again in the caller's layout,
and this model stays in it from then on (``model.fusion_layout`` says which).
"""
import torch

from .._util import is_compiling
from ..ops.stage_eval import LAYOUT as _STATE

__all__ = ["CallerLayout", "install"]


def _restore(out):
    """``out`` with every 4-D channels_last (not NCHW-contiguous) tensor made contiguous,
    through tuples, lists and dicts (their types kept); others returned as they are."""
    if isinstance(out, torch.Tensor):
        if out.dim() == 4 and not out.is_contiguous() and out.is_contiguous(
                memory_format=torch.channels_last):
            return out.contiguous()
        return out
    if isinstance(out, (tuple, list)):
        items = [_restore(v) for v in out]
        if all(a is b for a, b in zip(items, out)):
            return out
        if isinstance(out, tuple) and hasattr(out, "_fields"):  # a namedtuple
            return type(out)(*items)
        return type(out)(items)
    if isinstance(out, dict):
        items = {k: _restore(v) for k, v in out.items()}
        if all(items[k] is v for k, v in out.items()):
            return out
        try:
            return type(out)(items)
        except TypeError:
            return out
    return out


class CallerLayout:
    """The ``forward`` of a fused model's root (an instance attribute): runs the model's
    forward with the NCHW -> channels_last conversion allowed, and restores the caller's
    layout on the way out (see the module doc). Picklable and deep-copyable with the model."""

    def __init__(self, module, inner=None):
        self.module = module
        self.inner = inner  # the instance forward it replaced (a residual tail's), or None
        self.enabled = True

    def _forward(self, *args, **kwargs):
        if self.inner is not None:
            return self.inner(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        if not self.enabled or _STATE.active or is_compiling():
            return self._forward(*args, **kwargs)
        _STATE.active, _STATE.converted = True, False
        try:
            out = self._forward(*args, **kwargs)
            converted = _STATE.converted
        except RuntimeError:
            if not _STATE.converted:
                raise
            converted = None
        finally:
            _STATE.active, _STATE.converted = False, False
        if converted is None:
            # Run again as the caller gave it; if that fails too, the error is the caller's
            # own (and this model keeps converting).
            out = self._forward(*args, **kwargs)
            self.enabled = False  # (the model's own code cannot take channels_last tensors)
            self.module.__dict__["fusion_layout"] = "the caller's (its code needs NCHW tensors)"
            return out
        return _restore(out) if converted else out


def install(model) -> None:
    """Make ``model``'s forward a :class:`CallerLayout` (once)."""
    current = model.__dict__.get("forward")
    if isinstance(current, CallerLayout):
        return
    object.__setattr__(model, "forward", CallerLayout(model, current))
    model.__dict__["fusion_layout"] = "channels_last inside"
