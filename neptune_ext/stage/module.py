"""Stage: Conv2d -> BatchNorm2d (-> + residual) -> activation as one layer (see
neptune_ext.stage.functional for the math)."""
from typing import Optional, Tuple, Union

import torch
from torch import nn

from .fold_cache import FoldCache, PackCache
from .activations import apply_activation, check_activation
from .checks import conv_output_shape
from .eval import conv_bias
from .dispatch import stage_forward
# (the pass-through modules' first home: fused models pickled then name them from here)
from .passthrough import (FusedBatchNorm2d, FusedHardswish, FusedReLU,  # noqa: F401
                                FusedReLU6, FusedSiLU, rebuilt_as)
from .state_dict import bn_with_shifted_mean, load_sequential_state_dict

__all__ = ["Stage", "FoldedConv2d", "FusedConv2d", "FusedBatchNorm2d", "FusedReLU", "FusedReLU6",
           "FusedSiLU", "FusedHardswish", "stage_paths"]


def _explicit_padding(padding, kernel_size, dilation) -> Tuple[int, int]:
    """Conv2d padding as a pair of ints ('valid', 'same' with odd effective kernels, ints)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        if padding == "same":
            out = []
            for k, d in zip(kernel_size, dilation):
                total = d * (k - 1)
                if total % 2:
                    raise ValueError("padding='same' with an even effective kernel size needs "
                                     "asymmetric padding, which Stage does not support")
                out.append(total // 2)
            return tuple(out)
        raise ValueError(f"padding must be an int, a pair of ints, 'valid' or 'same', got {padding!r}")
    return (padding, padding) if isinstance(padding, int) else tuple(padding)


class _ActivationAttribute:
    """An activation-name attribute checked on assignment: ``stage.activation = "gelu"`` is a
    ValueError naming the attribute and the allowed values at once, not a surprise at the next
    call. ``optional``: None stays None (a FusedConv2d without a residual role) instead of
    meaning "none"."""

    def __init__(self, default: Optional[str], optional: bool = False):
        self.default, self.optional = default, optional

    def __set_name__(self, owner, name: str):
        self.name, self.slot = name, "_" + name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        d = obj.__dict__
        # (objects pickled before this was a property hold the plain attribute)
        return d.get(self.slot, d.get(self.name, self.default))

    def __set__(self, obj, value):
        if not (self.optional and value is None):
            value = check_activation(value, self.name)
        obj.__dict__[self.slot] = value


def _set_attribute(module: nn.Module, name: str, value) -> None:
    """nn.Module.__setattr__, except for an _ActivationAttribute, which is checked even when
    the value is a module or a tensor (nn.Module would register those as children/buffers
    beside the attribute, which would then hide them)."""
    if isinstance(getattr(type(module), name, None), _ActivationAttribute):
        getattr(type(module), name).__set__(module, value)
    else:
        nn.Module.__setattr__(module, name, value)


def _grows_output(residual: torch.Tensor, input: torch.Tensor, conv: nn.Conv2d) -> bool:
    """Whether ``output + residual`` has more values than the conv's output (broadcasting)."""
    shape = conv_output_shape(input, conv.weight, conv.stride, conv.padding, conv.dilation)
    if list(residual.shape) == shape:
        return False  # (the common case)
    try:
        return list(torch.broadcast_shapes(tuple(residual.shape), tuple(shape))) != list(shape)
    except RuntimeError:
        return False  # (no broadcast at all: the dispatch's shape check says so)


class _DerivedCache:
    """A module holding tensors derived from its parameters (the folded conv+BN, oneDNN-packed
    weights) in the attribute ``_cache_name``: emptied when the parameters move or change
    type (``_apply``: ``.to()``, ``.half()``, ...; the old tensors are not kept alive) and
    never copied or pickled (a copy starts with a fresh, empty one: packed tensors do not
    copy or pickle)."""
    _cache_name, _cache_type = "_fold", FoldCache

    def clear_cache(self) -> None:
        """Forget the derived tensors (the eval-mode fold: see ``cache_fold``)."""
        getattr(self, self._cache_name).clear()

    def _apply(self, fn, *args, **kwargs):
        self.clear_cache()
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = dict(super().__getstate__())
        state[self._cache_name] = self._cache_type()
        return state


class Stage(_DerivedCache, nn.Module):
    """``nn.Sequential(nn.Conv2d(..., bias=False), nn.BatchNorm2d(...), nn.ReLU())``, fused.

    ``activation`` picks the last module: ``"relu"`` (default), ``"relu6"``, ``"silu"``,
    ``"hardswish"`` or ``None``. ``stage(x, residual)`` computes
    ``activation(bn(conv(x)) + residual)``: the tail of a ResNet block.

    Holds the two modules as ``conv`` and ``bn`` (so the parameters, buffers and
    state-dict keys are theirs; a state dict of ``nn.Sequential(conv, bn, relu)``
    with keys ``0.*``/``1.*`` loads too) and computes exactly what the Sequential
    computes, in train and eval mode, including the running statistics and
    ``num_batches_tracked`` (momentum=None, track_running_stats and affine=False
    behave as in ``nn.BatchNorm2d``; the BN's own ``training`` flag decides, so a
    frozen ``stage.bn.eval()`` works as it would in the Sequential).

    - Training (batch statistics): conv2d, then one fused BN+ReLU kernel. The
      backward saves the conv input only and recomputes the conv output (one
      extra convolution), so a stack of Stages stores about half the activations
      of eager. ``memory_efficient=False`` saves the conv output instead (eager's
      memory, no recomputation).
    - Eval (running statistics): BN folded into the conv weight and bias, then one
      oneDNN convolution with a fused ReLU for channels_last float32 input, or
      conv2d + in-place ReLU. The fold is cached and rebuilt whenever a parameter
      or buffer is replaced or written in place (optimizer steps, ``load_state_dict``,
      ``torch.no_grad()`` updates: whatever bumps torch's version counter). Writes
      that bypass the version counter (through ``.data``, ``.numpy()`` or DLPack)
      are not seen: call :meth:`clear_cache` after them, or set
      ``stage.cache_fold = False`` to fold on every call.

    - Other activations and the residual add: eval as above (oneDNN fuses every
      activation, and ReLU after the add; cuDNN ReLU with or without the add);
      training runs the eager modules' computation (the fused BN kernel is BN+ReLU only).
    - Under ``torch.autocast``: what the eager Conv-BN-ReLU computes under autocast (same
      output dtype, statistics in float32). Training and autograd run the eager modules'
      computation; eval without autograd folds the BN in float32 and runs the fused
      convolution in autocast's dtype (equal to eager within that dtype's rounding).

    ``stage.last_path`` names how the latest call was computed (see :func:`stage_paths`).

    ``activation`` can be changed later (``stage.activation = "silu"``); a name outside
    the list above is a ValueError at the assignment. A ``residual`` must have the output's
    shape ``[N, out_channels, H_out, W_out]`` or broadcast to it (ValueError otherwise).

    Double backward (``torch.autograd.grad(..., create_graph=True)`` then a second grad)
    works in every mode: a backward asked to build a graph recomputes the eager
    computation from the saved inputs and differentiates that (eager's second derivatives).

    Args: as ``nn.Conv2d`` (without bias / padding_mode) and ``nn.BatchNorm2d``.

    Example::

        >>> stage = Stage(3, 16, 3, padding=1)
        >>> stage(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 16, 8, 8])
        >>> tail = Stage(16, 16, 3, padding=1)       # relu(bn(conv(x)) + identity)
        >>> tail(torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 16, 8, 8])
    """

    activation = _ActivationAttribute("relu")
    __setattr__ = _set_attribute
    last_path: Optional[str] = None  # see stage_paths

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1,
                 padding: Union[int, Tuple[int, int], str] = 0, dilation=1, groups: int = 1,
                 eps: float = 1e-5, momentum: Optional[float] = 0.1, *,
                 activation: Optional[str] = "relu", memory_efficient: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.activation = activation
        k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        d = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
        if padding == "same" and any(x != 1 for x in ((stride, stride) if isinstance(stride, int)
                                                       else tuple(stride))):
            raise ValueError("padding='same' is not supported for strided convolutions "
                             f"(stride={stride}), as in nn.Conv2d")
        self.conv = nn.Conv2d(in_channels, out_channels, k, stride, _explicit_padding(padding, k, d),
                              d, groups, bias=False, device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, device=device, dtype=dtype)
        self.memory_efficient = memory_efficient
        self.cache_fold = True
        self._fold = FoldCache()
        self.register_load_state_dict_pre_hook(load_sequential_state_dict)

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, *, activation: Optional[str] = "relu",
                     memory_efficient: bool = True) -> "Stage":
        """A Stage computing ``activation(bn(conv(x)))`` that shares ``conv`` and ``bn``'s
        parameters.

        A conv bias is folded into the BN: it cancels under batch statistics, and
        ``running_mean - bias`` gives the same eval output and the same running
        statistic updates. The Stage then gets a bias-free conv sharing
        ``conv.weight`` and a BN sharing ``bn.weight``/``bn.bias`` with shifted
        copies of the buffers, so the given modules stay valid. The Stage takes
        ``bn``'s training mode.
        """
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if not isinstance(bn, nn.BatchNorm2d):
            raise ValueError(f"bn must be an nn.BatchNorm2d, got {type(bn).__name__}")
        if bn.num_features != conv.out_channels:
            raise ValueError(f"bn has num_features = {bn.num_features} but conv has "
                             f"out_channels = {conv.out_channels}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"conv.padding_mode must be 'zeros', got {conv.padding_mode!r}")
        padding = _explicit_padding(conv.padding, conv.kernel_size, conv.dilation)
        stage = cls.__new__(cls)
        nn.Module.__init__(stage)
        if conv.bias is not None or isinstance(conv.padding, str):
            new_conv = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                 padding, conv.dilation, conv.groups, bias=False,
                                 device=conv.weight.device, dtype=conv.weight.dtype)
            new_conv.weight = conv.weight
            new_conv.train(conv.training)
            if conv.bias is not None:
                bn = bn_with_shifted_mean(bn, conv.bias.detach())
            conv = new_conv
        stage.conv, stage.bn = conv, bn
        stage.activation = activation
        stage.memory_efficient = memory_efficient
        stage.cache_fold = True
        stage._fold = FoldCache()
        stage.register_load_state_dict_pre_hook(load_sequential_state_dict)
        stage.training = bn.training
        return stage

    def forward(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        cache = self._fold if getattr(self, "cache_fold", True) else None
        return _recorded(self, stage_forward(self.conv, self.bn, input, self.memory_efficient,
                                             cache, self.activation, residual))

    def extra_repr(self) -> str:
        parts = [] if self.activation == "relu" else [f"activation={self.activation!r}"]
        return ", ".join(parts + ([] if self.memory_efficient else ["memory_efficient=False"]))


class FoldedConv2d(_DerivedCache, nn.Conv2d):
    """An ``nn.Conv2d`` with bias that holds a folded Conv2d -> BatchNorm2d (for
    inference-only models whose BN was folded once and for all).

    Same parameters and semantics as ``nn.Conv2d``; for channels_last float32 CPU
    input outside autograd it runs one oneDNN convolution on a weight prepacked
    once (repacked when the weight or the input shape changes) instead of
    reordering the weight on every call.
    """
    _cache_name, _cache_type = "_pack", PackCache

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pack = PackCache()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(input)
        return conv_bias(input, self.weight, self.bias, self.stride, self.padding,
                             self.dilation, self.groups, cache=self._pack)


class FusedConv2d(_DerivedCache, nn.Conv2d):
    """A Conv2d of a model that :func:`neptune_ext.fuse_stages` fused with the
    BatchNorm2d after it (and the activation after that, ``activation``; or, for the
    tail of a residual block, the add and the activation after it).

    It replaces the model's conv in its parent (:meth:`convert`): a new module with the
    conv's attributes and the very same weight (and bias) tensors, so the state-dict keys
    and an optimizer built before fusing stay valid. The BN stays where it was, replaced
    in the same way by a :class:`FusedBatchNorm2d` that shares its parameters and buffers
    and passes its input through. This module computes ``activation(bn(conv(x)))`` with
    that BN, in whatever mode the BN is in at call time: batch statistics (the fused
    BN+ReLU kernel for ReLU) in training, the folded convolution in eval. A residual
    tail's conv also takes the identity: ``conv(x, identity)`` is
    ``residual_activation(bn(conv(x)) + identity)`` (one argument: ``bn(conv(x))``, which
    the block's own code then adds and activates).

    The BN is also this module's child ``bn`` (``print`` shows it inside the conv), so that
    what the conv uses at call time is reached through its own ``_modules``: a copy that
    rebinds children (``nn.DataParallel``'s replicas, ``copy.deepcopy``) gets its own BN.
    Its home is its parent: ``named_modules``/``named_children`` (and through them
    ``parameters``, ``buffers``, ``modules``, ``apply``, ``to``, ``train``) and the state
    dict leave it out here, so names and keys are the model's (``layer1.0.bn1.weight``,
    never ``layer1.0.conv1.bn.weight``).
    The fold cache behaves as :class:`Stage`'s (``cache_fold``, :meth:`clear_cache`), and so
    does ``last_path``.
    ``activation`` and ``residual_activation`` are checked on assignment as Stage's.

    Hooks registered on the conv, its BN or the activation *after* fusion see the fused
    values: the conv's output is already ``activation(bn(conv(x)))``, the BN and a fused
    activation module pass it through. (``fuse_stages`` leaves a chain whose modules have
    hooks at fusion time unfused.)
    """

    activation = _ActivationAttribute("relu")
    residual_activation = _ActivationAttribute(None, optional=True)
    __setattr__ = _set_attribute
    last_path: Optional[str] = None  # see stage_paths

    def forward(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if residual is None:
            activation = self.activation
        elif self.residual_activation is None:
            raise ValueError("this FusedConv2d was not fused with a residual add: call it with "
                             "one input")
        else:
            activation = self.residual_activation
            if _grows_output(residual, input, self):
                # The model's own add broadcasts the output up to the residual's shape (a
                # Stage refuses that): the conv and BN fused, the add and activation eager.
                out = self.forward(input) + residual
                return apply_activation(out, activation, inplace=False)
        return _recorded(self, stage_forward(self, self.bn, input, self.memory_efficient,
                                             self._fold if self.cache_fold else None, activation,
                                             residual))

    @classmethod
    def convert(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, activation: Optional[str],
                residual_activation: Optional[str] = None) -> "FusedConv2d":
        """A new FusedConv2d computing ``activation(bn(conv(x)))`` with ``conv``'s own
        parameters and ``bn`` (its child ``bn``), and with ``residual_activation`` (an
        activation name or ``"none"``) also taking a residual. ``conv`` is not changed: the
        caller registers the result in its place (and ``bn``, a pass-through, in the BN's)."""
        fused = rebuilt_as(conv, cls)
        fused.padding = _explicit_padding(conv.padding, conv.kernel_size, conv.dilation)
        fused._modules["bn"] = bn
        fused.activation = activation
        fused.residual_activation = residual_activation
        fused.memory_efficient = True
        fused.cache_fold = True
        fused._fold = FoldCache()
        return fused

    # The BN is named, counted, moved and saved by its parent, not by the conv (see above).
    def named_children(self):
        return ((name, m) for name, m in super().named_children() if name != "bn")

    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True):
        if memo is None:
            memo = set()
        if self in memo:
            return
        if remove_duplicate:
            memo.add(self)
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(memo, prefix + ("." if prefix else "") + name,
                                           remove_duplicate)

    def state_dict(self, *args, **kwargs):
        out = super().state_dict(*args, **kwargs)
        prefix = args[1] if len(args) > 1 else kwargs.get("prefix", "")  # (positional: deprecated)
        for key in [k for k in out if k.startswith(prefix + "bn.")]:
            del out[key]
        getattr(out, "_metadata", {}).pop(prefix + "bn", None)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # load_state_dict also visits the child BN here: give it its own current tensors (a
        # no-op copy), so that it reports no missing keys; its parent loads the real ones.
        bn = self._modules.get("bn")
        if bn is not None:
            for key, value in bn.state_dict(keep_vars=True).items():
                state_dict.setdefault(prefix + "bn." + key, value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _replicate_for_data_parallel(self):
        replica = super()._replicate_for_data_parallel()
        replica._fold = FoldCache()  # (its own tensors, its own thread: its own fold)
        return replica

    def __setstate__(self, state):
        super().__setstate__(state)
        old = self.__dict__.pop("fused_bn", None)  # (pickled when the BN was a plain attribute)
        if old is not None:
            self._modules.setdefault("bn", old)

    @property
    def relu_fused(self) -> bool:
        """Whether a one-input call ends with a ReLU (a Conv->BN->ReLU Stage)."""
        return self.activation == "relu"


    def extra_repr(self) -> str:
        tail = " + BN" if self.activation == "none" else f" + BN + {self.activation}"
        if self.residual_activation is not None:
            tail += " (with a residual: + BN + residual"
            tail += ")" if self.residual_activation == "none" else f" + {self.residual_activation})"
        return super().extra_repr() + "," + tail


def stage_paths(model: nn.Module) -> dict:
    """{module name: path} of every Stage and fused conv of ``model``: how its latest call
    was computed, as the module keeps it in ``last_path`` (None before the first, and not
    recorded under torch.compile). Evaluation: ``onednn-fused``, ``cutlass-fused``,
    ``onednn+activation``, ``cudnn-fused``, ``conv+bias``, ``autograd`` (see
    ``neptune_ext.stage.paths``); training: ``bn-relu-kernel`` (conv, then the fused
    BN+ReLU kernel), ``conv-bn-recompute`` (ATen's BN, recomputing backward), ``eager`` (the
    eager modules' computation: autocast rules, SiLU/Hardswish, broadcasting residuals)."""
    return {name: m.last_path for name, m in model.named_modules()
            if isinstance(m, (Stage, FusedConv2d))}


def _recorded(module: nn.Module, result) -> torch.Tensor:
    """The output of ``(output, path)`` from the dispatch; the path kept on ``module`` as
    ``last_path`` (None, under torch.compile: nothing is recorded). Each module holds its own
    latest path, so threads running different models read back their own."""
    out, path = result
    if path is not None:
        module.__dict__["last_path"] = path  # (a plain attribute: no nn.Module bookkeeping)
    return out
