"""BN folded into a convolution, oneDNN weight prepacking, and the caches of both
(rebuilt whenever a source tensor changes in a way torch's version counter sees)."""
from typing import Optional, Sequence, Tuple

import torch

__all__ = ["fold_conv_bn", "pack_conv_weight", "FoldCache", "PackCache"]


def fold_conv_bn(conv_weight: torch.Tensor, conv_bias: Optional[torch.Tensor],
                 bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
                 running_mean: torch.Tensor, running_var: torch.Tensor, eps: float,
                 compute_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the convolution equivalent to conv -> BN(eval):

        scale = bn_weight / sqrt(running_var + eps)
        W'    = conv_weight * scale[:, None, None, None]
        b'    = (conv_bias - running_mean) * scale + bn_bias

    Differentiable. ``compute_dtype`` (e.g. float64) computes in higher precision
    and casts the result back to conv_weight's dtype.
    """
    dt = compute_dtype or conv_weight.dtype
    C = conv_weight.shape[0]
    rv = running_var.to(dt)
    scale = torch.rsqrt(rv + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(dt)
    shift = -running_mean.to(dt) if conv_bias is None else conv_bias.to(dt) - running_mean.to(dt)
    bias = shift * scale
    if bn_bias is not None:
        bias = bias + bn_bias.to(dt)
    weight = conv_weight.to(dt) * scale.reshape(C, 1, 1, 1)
    return weight.to(conv_weight.dtype), bias.to(conv_weight.dtype)


def pack_conv_weight(weight: torch.Tensor, stride, padding, dilation, groups: int,
                     input_size: Sequence[int]) -> torch.Tensor:
    """oneDNN-prepacked (opaque, inference-only) copy of a conv weight."""
    return torch.ops.mkldnn._reorder_convolution_weight(
        weight, list(padding), list(stride), list(dilation), groups, list(input_size))


def _stamps(tensors):
    """(version, data_ptr, dtype, device) per tensor; None if one is an inference tensor
    (those have no version counter)."""
    try:
        return tuple(None if t is None else (t._version, t.data_ptr(), t.dtype, t.device)
                     for t in tensors)
    except RuntimeError:
        return None


class _Memo:
    """One value derived from some tensors, rebuilt when any of them changes.

    The key holds each source tensor itself (so its memory cannot be reused by
    another tensor while cached), its version counter (bumped by every in-place
    write: optimizer steps, load_state_dict's copy_, ...), data_ptr, dtype and
    device, plus hashable extras. With inference tensors nothing is cached.
    """

    def __init__(self):
        self.clear()

    def clear(self):
        self.sources, self.key, self.value = None, None, None

    def get(self, sources, extra, build):
        stamps = _stamps(sources)
        if stamps is None:
            self.clear()
            return build(), False
        key = (stamps, extra)
        if (self.sources is None or key != self.key
                or not all(a is b for a, b in zip(sources, self.sources))):
            self.value = build()
            self.sources, self.key = tuple(sources), key
        return self.value, True


_MAX_PACKS = 4  # packed copies kept per weight: one per input shape (batch 1 and 8, ...)


def _packed_in(packs: dict, weight, stride, padding, dilation, groups, input):
    """``weight`` packed for ``input``'s shape and this convolution, from ``packs`` (a dict
    serving this weight only) or packed now and kept there (the latest few)."""
    shape = tuple(input.shape)
    key = (shape, tuple(stride), tuple(padding), tuple(dilation), groups)
    value = packs.get(key)
    if value is None:
        if len(packs) >= _MAX_PACKS:
            packs.pop(next(iter(packs)))
        value = packs[key] = pack_conv_weight(weight, stride, padding, dilation, groups, shape)
    return value


class PackCache:
    """A conv weight prepacked for oneDNN, one copy per input shape and convolution (the
    latest few), all dropped when the weight changes (see _Memo)."""

    def __init__(self):
        self.pack = _Memo()  # value: {(input shape, stride, padding, dilation, groups): packed}

    def clear(self):
        self.pack.clear()

    def packed(self, weight, stride, padding, dilation, groups, input):
        packs, _ = self.pack.get((weight,), (), dict)
        return _packed_in(packs, weight, stride, padding, dilation, groups, input)

    def packs(self) -> dict:
        """The packed copies held now (for tests)."""
        return dict(self.pack.value or {})


class FoldCache:
    """The folded weight/bias of one conv + BN pair, and oneDNN-packed copies of that weight,
    rebuilt whenever a parameter or buffer changes (see _Memo).

    The packed copies belong to the fold they were made from: the folded weight is this
    cache's own tensor, never written after it is made, so the packs are valid exactly as
    long as the fold is. (Keying them on the folded weight's version counter would repack
    on every call under ``torch.inference_mode``, where the fold is an inference tensor
    without one.)"""

    def __init__(self):
        self.fold = _Memo()  # value: (weight, bias, {pack key: packed weight})
        self.plan = None  # the latest oneDNN call (see eval.replay_eval)

    def clear(self):
        self.fold.clear()
        self.plan = None

    def folded(self, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps,
               dtype: Optional[torch.dtype] = None, channels_last: bool = False):
        """((weight, bias), cacheable): folded in float64, in ``dtype`` (default conv_weight's),
        the weight channels_last-contiguous if asked."""
        sources = (conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var)

        def build():
            with torch.no_grad():
                w, b = fold_conv_bn(*sources, eps, compute_dtype=torch.float64)
                if dtype is not None:
                    w, b = w.to(dtype), b.to(dtype)
                if channels_last:
                    w = w.contiguous(memory_format=torch.channels_last)
                return w, b, {}
        (w, b, _), cacheable = self.fold.get(sources, (float(eps), dtype, channels_last), build)
        return (w, b), cacheable

    def packed(self, weight, stride, padding, dilation, groups, input):
        """The folded ``weight`` (what :meth:`folded` just returned, cacheable) packed for
        ``input``'s shape and this convolution."""
        value = self.fold.value
        if value is None or value[0] is not weight:
            raise ValueError("FoldCache.packed takes the weight its folded() just returned")
        return _packed_in(value[2], weight, stride, padding, dilation, groups, input)

    def packs(self) -> dict:
        """The packed copies of the current fold (for tests)."""
        return dict(self.fold.value[2]) if self.fold.value is not None else {}
