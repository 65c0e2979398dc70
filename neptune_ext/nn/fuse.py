"""fuse_stages(model): Conv2d -> BatchNorm2d (-> ReLU) chains run as one fused layer.

Patterns are found on the torch.fx graph (data flow), not in module order, so
torchvision's ResNet blocks, which call one shared ``relu`` module several times,
are handled: a conv node whose only user is a BatchNorm2d node (whose only user
is a ReLU: ``nn.ReLU`` module, ``F.relu``, ``torch.relu``, ``x.relu()``, in place
or not) is fused.

The trace is used for analysis only. The model keeps its own code and its own
module tree: each fused conv module becomes a :class:`~neptune_ext.nn.stage.FusedConv2d`
in place (same parameters), its BN a pass-through
:class:`~neptune_ext.nn.stage.FusedBatchNorm2d` that keeps its parameters and
buffers, and a ReLU module used only there a pass-through
:class:`~neptune_ext.nn.stage.FusedReLU`; a ReLU that is shared or a function call
stays and reapplies ReLU to a non-negative tensor (a no-op). So the fused model
has the original's type, attributes, methods and state-dict keys, and
``if self.training:`` branches, dropout and stochastic depth keep following
``train()``/``eval()``. Code that the trace would bake a mode into (the graph
differs between train and eval) and code torch.fx cannot trace are not analysed
as a whole: their children are fused one by one.
"""
import copy
from collections import Counter
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from .stage import (FoldedConv2d, FusedBatchNorm2d, FusedConv2d, FusedReLU, Stage,
                       _explicit_padding)

__all__ = ["fuse_stages"]

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_RELU_METHODS = {"relu", "relu_"}


def fuse_stages(model: nn.Module, inplace: bool = False, verbose: bool = False) -> nn.Module:
    """Fuse every Conv2d -> BatchNorm2d -> ReLU chain of ``model`` (and every
    Conv2d -> BatchNorm2d chain without the ReLU).

    Args:
        model: any module, in train or eval mode; the fused model follows later
            ``train()``/``eval()`` calls as the original would (train: batch
            statistics, the fused BN+ReLU kernel; eval: the BN folded into the conv).
        inplace: convert ``model``'s own modules instead of a deep copy's.
        verbose: print what was fused.

    Returns:
        The fused model: the same class as ``model`` with the same state-dict keys
        (a state dict of either loads into the other), with ``fusion_report``: a
        list like ``["layer1.0.conv1+bn1+relu -> Stage", "layer1.0.conv2+bn2 -> Conv+BN"]``.
        Its outputs equal the original's up to floating-point rounding.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report: List[str] = []
    registrations = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    _fuse(model, "", report, registrations)
    model.fusion_report = report
    if verbose:
        print(f"fuse_stages: {len(report)} fusion(s)")
        for line in report:
            print("  " + line)
    return model


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (Stage, FusedConv2d)) or super().is_leaf_module(m, qualname)


def _trace(module: nn.Module) -> Optional[fx.Graph]:
    """The module's graph if torch.fx can trace it the same way in train and eval mode."""
    modes = {m: m.training for m in module.modules()}
    graphs = []
    try:
        for mode in (True, False):
            module.train(mode)
            graphs.append(_Tracer().trace(module))
    except Exception:  # noqa: BLE001 - untraceable (data-dependent control flow, ...)
        return None
    finally:
        for m, mode in modes.items():
            m.training = mode
    if _signature(graphs[0]) != _signature(graphs[1]):
        return None  # the code depends on the mode: a trace would freeze it
    return graphs[0]


def _signature(graph: fx.Graph):
    return [(n.op, str(n.target), str(n.args), str(n.kwargs)) for n in graph.nodes]


def _fuse(module: nn.Module, prefix: str, report: List[str], registrations: Counter) -> None:
    if isinstance(module, (Stage, FusedConv2d)) or not any(True for _ in module.children()):
        return
    graph = _trace(module)
    if graph is None:
        for name, child in module.named_children():
            _fuse(child, f"{prefix}{name}.", report, registrations)
        return
    _rewrite(module, graph, prefix, report, registrations)


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _relu_of(node: Optional[fx.Node], arg: fx.Node, modules: Dict[str, nn.Module]):
    """(name for the report, the nn.ReLU module or None) if ``node`` is relu(arg), else None."""
    if node is None or not node.args or node.args[0] is not arg:
        return None
    if node.op == "call_module" and type(modules.get(node.target)) is nn.ReLU:
        return node.target, modules[node.target]
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return node.target.__name__, None
    if node.op == "call_method" and node.target in _RELU_METHODS and len(node.args) == 1:
        return node.target, None
    return None


def _fusable(conv, bn) -> bool:
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


def _rewrite(root: nn.Module, graph: fx.Graph, prefix: str, report: List[str],
             registrations: Counter) -> None:
    modules = dict(root.named_modules())
    calls = Counter(id(modules[n.target]) for n in graph.nodes
                    if n.op == "call_module" and n.target in modules)

    def used_once(m: nn.Module) -> bool:
        # Called once in this graph and registered once in the whole model.
        return calls[id(m)] == 1 and registrations[id(m)] == 1

    for conv_node in graph.nodes:
        if conv_node.op != "call_module" or not isinstance(modules.get(conv_node.target), nn.Conv2d):
            continue
        bn_node = _only_user(conv_node)
        if (bn_node is None or bn_node.op != "call_module" or bn_node.args != (conv_node,)
                or bn_node.kwargs):
            continue
        conv, bn = modules[conv_node.target], modules.get(bn_node.target)
        # A module called twice shares its weights between two places: leave it.
        if not _fusable(conv, bn) or not used_once(conv) or not used_once(bn):
            continue
        relu = _relu_of(_only_user(bn_node), bn_node, modules)
        names = f"{prefix}{conv_node.target}+{_short(bn_node.target, conv_node.target)}"
        bn.__class__ = FusedBatchNorm2d
        FusedConv2d.convert(conv, bn, relu_fused=relu is not None)
        if relu is None:
            report.append(f"{names} -> Conv+BN")
            continue
        relu_name, relu_module = relu
        if relu_module is not None and used_once(relu_module):
            relu_module.__class__ = FusedReLU
        report.append(f"{names}+{_short(relu_name, conv_node.target)} -> Stage")
