"""fuse_stages(model): Conv2d -> BatchNorm2d -> ReLU chains become Stages.

Patterns are found on the torch.fx graph (data flow), not in module order, so
torchvision's ResNet blocks, which call one shared ``relu`` module several times,
are handled: a conv node whose only user is a BatchNorm2d node whose only user
is a ReLU (``nn.ReLU`` module, ``F.relu``, ``torch.relu``, ``x.relu()``, in place
or not) is one Stage. In eval mode, a Conv2d -> BatchNorm2d pair without the ReLU
is folded into one Conv2d with bias (in training such a BN stays, so a fused
model trains exactly like the original).

Models that torch.fx cannot trace as a whole are fused submodule by submodule.
"""
import copy
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from .nn.stage import FoldedConv2d, Stage, _explicit_padding
from .ops.stage import fold_conv_bn

__all__ = ["fuse_stages"]

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_RELU_METHODS = {"relu", "relu_"}


def fuse_stages(model: nn.Module, inplace: bool = False, verbose: bool = False) -> nn.Module:
    """Replace every Conv2d -> BatchNorm2d -> ReLU chain of ``model`` by a :class:`Stage`
    and, for BNs in eval mode, fold Conv2d -> BatchNorm2d chains into a Conv2d.

    Args:
        model: any module; the BNs' training flags decide (train: only Stages;
            eval: Stages and folds). Fold only a model you will use for inference:
            a folded BN is gone when the model is switched back to ``train()``
            (the Stages keep their BN and train exactly like the original).
        inplace: reuse ``model``'s modules instead of working on a deep copy (the
            original object must not be used afterwards).
        verbose: print what was fused.

    Returns:
        The fused model (a ``torch.fx.GraphModule`` where the model was traced)
        with ``fusion_report``: a list like ``["layer1.0.conv1+bn1+relu -> Stage", ...]``.
        Its outputs equal the original's (up to floating-point rounding of the fold).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report: List[str] = []
    fused = _fuse(model, "", report)
    fused.fusion_report = report
    if verbose:
        print(f"fuse_stages: {len(report)} fusion(s)")
        for line in report:
            print("  " + line)
    return fused


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Stage) or super().is_leaf_module(m, qualname)


def _fuse(module: nn.Module, prefix: str, report: List[str]) -> nn.Module:
    if isinstance(module, Stage) or not any(True for _ in module.children()):
        return module
    try:
        graph = _Tracer().trace(module)
    except Exception:  # noqa: BLE001 - untraceable (data-dependent control flow, ...)
        for name, child in list(module.named_children()):
            new = _fuse(child, f"{prefix}{name}.", report)
            if new is not child:
                setattr(module, name, new)
        return module
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    return gm if _rewrite(gm, prefix, report) else module


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_relu_of(node: Optional[fx.Node], arg: fx.Node, modules) -> Optional[str]:
    """The ReLU's name for the report if ``node`` is relu(arg), else None."""
    if node is None or not node.args or node.args[0] is not arg:
        return None
    if node.op == "call_module" and type(modules.get(node.target)) is nn.ReLU:
        return node.target
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return node.target.__name__
    if node.op == "call_method" and node.target in _RELU_METHODS and len(node.args) == 1:
        return node.target
    return None


def _stage_compatible(conv, bn) -> bool:
    # Exact types: a subclass (QAT, weight-standardized, ...) may compute something else.
    if type(conv) not in (nn.Conv2d, FoldedConv2d) or type(bn) is not nn.BatchNorm2d:
        return False
    if conv.padding_mode != "zeros" or bn.num_features != conv.out_channels:
        return False
    try:
        _explicit_padding(conv.padding, conv.kernel_size, conv.dilation)
    except ValueError:
        return False
    return conv.weight.device == (bn.weight if bn.weight is not None else conv.weight).device


def _short(name: str, base: str) -> str:
    """``name`` relative to the parent of ``base`` when they share it."""
    parent = base.rpartition(".")[0]
    return name[len(parent) + 1:] if parent and name.startswith(parent + ".") else name


def _rewrite(gm: fx.GraphModule, prefix: str, report: List[str]) -> bool:
    modules = dict(gm.named_modules())
    calls = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    changed = False
    for conv_node in list(gm.graph.nodes):
        if conv_node.op != "call_module" or not isinstance(modules.get(conv_node.target), nn.Conv2d):
            continue
        bn_node = _only_user(conv_node)
        if (bn_node is None or bn_node.op != "call_module" or bn_node.args != (conv_node,)
                or bn_node.kwargs):
            continue
        conv, bn = modules[conv_node.target], modules.get(bn_node.target)
        # A module called twice shares its weights between two places: leave it.
        if (not _stage_compatible(conv, bn) or calls[conv_node.target] != 1
                or calls[bn_node.target] != 1):
            continue
        relu_node = _only_user(bn_node)
        relu_name = _is_relu_of(relu_node, bn_node, modules)
        names = f"{prefix}{conv_node.target}+{_short(bn_node.target, conv_node.target)}"
        if relu_name is not None:
            new = Stage.from_modules(conv, bn)
            relu_node.replace_all_uses_with(conv_node)
            gm.graph.erase_node(relu_node)
            report.append(f"{names}+{_short(relu_name, conv_node.target)} -> Stage")
        elif not bn.training and bn.track_running_stats and bn.running_mean is not None:
            new = _folded_conv(conv, bn)
            report.append(f"{names} -> Conv2d (BN folded)")
        else:
            continue
        bn_node.replace_all_uses_with(conv_node)
        gm.graph.erase_node(bn_node)
        _set_submodule(gm, conv_node.target, new)
        changed = True
    if changed:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return changed


def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> FoldedConv2d:
    with torch.no_grad():
        w, b = fold_conv_bn(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                            bn.running_var, bn.eps, compute_dtype=torch.float64)
    new = FoldedConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv.padding, conv.dilation, conv.groups, bias=True,
                    padding_mode=conv.padding_mode, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        new.bias.copy_(b)
    new.train(conv.training)
    return new


def _set_submodule(root: nn.Module, target: str, module: nn.Module):
    parent_name, _, name = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, name, module)
