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
import inspect
import types

import torch
from torch.utils._pytree import tree_leaves

from ..._util import functorch_active as _under_functorch, is_compiling
from ..eval import LAYOUT as _STATE

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


def _convertible(t: torch.Tensor) -> bool:
    """An input the CPU conversion could take: a CPU NCHW float32/bfloat16 4-D tensor."""
    return (t.device.type == "cpu" and t.dim() == 4 and t.dtype in (torch.float32, torch.bfloat16)
            and t.is_contiguous())


def _version(t: torch.Tensor):
    """``t``'s version counter (bumped by every in-place write), or None for an inference
    tensor, which has none."""
    return None if t.is_inference() else t._version


def _refuse_tracers(args, kwargs) -> None:
    """torch.jit.trace cannot record a fused model (its layers decide their paths in Python,
    on values the tracer does not have): a clear error instead of the tracer's internal
    assert. (torch.fx.symbolic_trace calls the class's forward, not this one: the fused
    Stages refuse its proxies, neptune_ext/stage/dispatch.py.)"""
    if torch.jit.is_tracing():
        raise RuntimeError("fuse_stages: a fused model cannot be traced with torch.jit.trace; "
                           "use torch.compile, or trace (or export) the model before fuse_stages")


def _code_of(f):
    f = getattr(f, "__func__", f)  # a bound method's function
    return getattr(f, "func", f).__code__  # (a functools.partial's)


class _ForwardAttr:
    """An attribute of the forward a :class:`CallerLayout` stands for, ``get(forward)``;
    absent (AttributeError) where that forward has none, and None on the class itself (so
    ``inspect.signature(CallerLayout)`` and doc tools see a plain class)."""

    def __init__(self, get):
        self.get = get

    def __get__(self, layout, owner=None):
        if layout is None:
            return None
        try:
            return self.get(layout._target())
        except (AttributeError, TypeError, ValueError) as exc:
            raise AttributeError(f"the forward a fused model stands for has none: {exc}") from None


class CallerLayout:
    """The ``forward`` of a fused model's root (an instance attribute): runs the model's
    forward with the NCHW -> channels_last conversion allowed, and restores the caller's
    layout on the way out (see the module doc). Picklable and deep-copyable with the model.

    ``code``: the root's own residual tails (a :class:`~neptune_ext.stage.fuse.block.FusedCode`,
    which the root runs instead of its class's forward), or None.

    Why an instance ``forward``: the model keeps its class (a wrapper would change it), and
    a call whose code fails on channels_last tensors is run again in NCHW, which a forward
    pre-hook and hook cannot do (the forward has run and its error goes to the caller); nor
    can they run a rewritten forward instead of the class's. ``nn.DataParallel`` copies the
    instance attributes of the replicas it makes, so :func:`install` also gives the root a
    ``_replicate_for_data_parallel`` (:meth:`replicate`) that gives each replica a
    CallerLayout of its own."""

    code = None  # (objects pickled before it existed)
    proven = False  # a call has run in channels_last (from then on no input is copied)

    def __init__(self, module, inner=None, code=None):
        self.module = module
        self.inner = inner  # the instance forward the model had before fusing, or None
        self.code = code
        self.enabled = True

    def _target(self):
        """The forward this one stands for: the instance forward the model had before fusing,
        else its class's, bound to the model (the root's residual tails follow the class's
        signature)."""
        if self.code is None and self.inner is not None:
            return self.inner
        return types.MethodType(type(self.module).forward, self.module)

    # torch.export reads a module's ``forward.__code__`` (where its guards point) and binds the
    # example inputs to ``inspect.signature(forward)``: the forward this one stands for gives
    # both, so a fused model exports like the original (a call's signature is not *args).
    __code__ = _ForwardAttr(_code_of)
    __signature__ = _ForwardAttr(inspect.signature)

    def _forward(self, *args, **kwargs):
        if self.code is not None:
            return self.code(self.module, *args, **kwargs)
        if self.inner is not None:
            return self.inner(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        _refuse_tracers(args, kwargs)
        if not self.enabled or _STATE.active or is_compiling() or _under_functorch():
            return self._forward(*args, **kwargs)
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        versions = [_version(t) for t in inputs]
        # Until a call has run in channels_last, the inputs that call would convert are
        # kept: if the model's code fails on channels_last tensors after writing into one,
        # the write is undone before the call runs again in NCHW. (No copy in training, on
        # CUDA, or once a call has converted.)
        keep = not (self.proven or self.module.training)
        kept = [t.detach().clone() if keep and _convertible(t) else None for t in inputs]
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
            # (an inference tensor has no version counter: restored if it was kept)
            written = [i for i, t in enumerate(inputs)
                       if (kept[i] is not None if versions[i] is None else _version(t) != versions[i])]
            if any(kept[i] is None for i in written):
                raise RuntimeError(
                    "fuse_stages: this model's code failed on channels_last tensors after "
                    "writing into its input in place, so the call cannot be run again in NCHW; "
                    "set model.forward.enabled = False to keep the caller's layout")
            with torch.no_grad():
                for i in written:
                    inputs[i].copy_(kept[i])
            # Run again as the caller gave it; if that fails too, the error is the caller's
            # own (and this model keeps converting).
            out = self._forward(*args, **kwargs)
            self.enabled = False  # (the model's own code cannot take channels_last tensors)
            self.module.__dict__["fusion_layout"] = "the caller's (its code needs NCHW tensors)"
            return out
        if converted:
            self.proven = True
        return _restore(out) if converted else out

    def replicate(self):
        """The root's ``_replicate_for_data_parallel``: its class's, and a CallerLayout of
        the replica's own (the shallow copy of the root's attributes would call the root)."""
        replica = type(self.module)._replicate_for_data_parallel(self.module)
        layout = CallerLayout(replica, self.inner, self.code)
        layout.enabled = self.enabled
        _attach(replica, layout)
        return replica


def _attach(model, layout: CallerLayout) -> None:
    object.__setattr__(model, "forward", layout)
    object.__setattr__(model, "_replicate_for_data_parallel", layout.replicate)


def install(model, code=None) -> None:
    """Make ``model``'s forward a :class:`CallerLayout` (once) that runs ``code`` (the
    root's residual tails) or the forward it had."""
    current = model.__dict__.get("forward")
    if isinstance(current, CallerLayout):
        return
    _attach(model, CallerLayout(model, current, code))
    model.__dict__["fusion_layout"] = "channels_last inside"
