"""The activations a Stage can end with: their names, the check of a name, how each is
applied, and oneDNN's name for each (its post-op after a convolution)."""
import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "check_activation", "apply_activation", "ONEDNN_UNARY"]

ACTIVATIONS = ("relu", "relu6", "silu", "hardswish", "none")
# oneDNN's name and scalars for each.
ONEDNN_UNARY = {"relu": ("relu", []), "relu6": ("hardtanh", [0.0, 6.0]), "silu": ("swish", []),
                "hardswish": ("hardswish", []), "none": ("none", [])}


def check_activation(activation, name: str = "activation") -> str:
    """``activation`` as one of ACTIVATIONS (None means "none"); a ValueError naming ``name``
    otherwise."""
    if activation is None:
        return "none"
    if not isinstance(activation, str) or activation.lower() not in ACTIVATIONS:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in ACTIVATIONS)} "
                         f"or None, got {activation!r}")
    return activation.lower()


def apply_activation(out: torch.Tensor, activation: str, inplace: bool) -> torch.Tensor:
    """``activation(out)``, written into ``out`` when ``inplace``."""
    if activation == "relu":
        # Out of place a clamp (its backward keeps the input, not the output), so a later
        # in-place ReLU on the result stays legal under autograd, as in eager.
        return out.relu_() if inplace else out.clamp_min(0)
    if activation == "relu6":
        return F.hardtanh(out, 0.0, 6.0, inplace=inplace)
    if activation == "silu":
        return F.silu(out, inplace=inplace)
    if activation == "hardswish":
        return F.hardswish(out, inplace=inplace)
    return out
