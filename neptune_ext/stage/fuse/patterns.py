"""What ``fuse_stages`` recognizes in a traced graph: the activations it fuses (modules,
functions, methods), a residual add, and the Conv2d -> BatchNorm2d pairs it may fuse."""
import operator
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..module import FoldedConv2d, _explicit_padding
from ..passthrough import FusedHardswish, FusedReLU, FusedReLU6, FusedSiLU

# Activation modules (exact types) -> (name, pass-through class); functions and methods -> name.
_ACT_MODULES = {nn.ReLU: ("relu", FusedReLU), nn.ReLU6: ("relu6", FusedReLU6),
                nn.SiLU: ("silu", FusedSiLU), nn.Hardswish: ("hardswish", FusedHardswish)}
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu",
                  F.relu6: "relu6", F.silu: "silu", F.hardswish: "hardswish"}
_ACT_METHODS = {"relu": "relu", "relu_": "relu"}
_IDEMPOTENT = {"relu", "relu6"}  # act(act(x)) == act(x): a shared module may stay and reapply
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_INPLACE_ADDS = {operator.iadd, "add_"}  # write into their first argument


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _act_of(node: Optional[fx.Node], arg: fx.Node, modules: Dict[str, nn.Module]):
    """(name for the report, activation, its module or None) if ``node`` is act(arg), else None."""
    if node is None or not node.args or node.args[0] is not arg:
        return None
    if node.op == "call_module" and type(modules.get(node.target)) in _ACT_MODULES:
        if len(node.args) != 1 or node.kwargs:
            return None
        return node.target, _ACT_MODULES[type(modules[node.target])][0], modules[node.target]
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        # Only act(x) and act(x, inplace=...): other arguments could change what it computes.
        if len(node.args) != 1 or set(node.kwargs) - {"inplace"}:
            return None
        return node.target.__name__, _ACT_FUNCTIONS[node.target], None
    if node.op == "call_method" and node.target in _ACT_METHODS and len(node.args) == 1 \
            and not node.kwargs:
        return node.target, _ACT_METHODS[node.target], None
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


def _conv_bn_pairs(graph: fx.Graph, modules: Dict[str, nn.Module], used_once, shared=None):
    """(conv node, bn node, conv, bn) for every fusable Conv2d whose only user is a
    BatchNorm2d call on it alone, both modules called and registered once; ``shared(conv
    node, bn node)`` is told of the pairs left out because one is used or held twice."""
    for conv_node in list(graph.nodes):
        if conv_node.op != "call_module" or not isinstance(modules.get(conv_node.target), nn.Conv2d):
            continue
        bn_node = _only_user(conv_node)
        if (bn_node is None or bn_node.op != "call_module" or bn_node.args != (conv_node,)
                or bn_node.kwargs):
            continue
        conv, bn = modules[conv_node.target], modules.get(bn_node.target)
        # A module called twice shares its weights between two places: leave it.
        if not _fusable(conv, bn):
            continue
        if used_once(conv) and used_once(bn):
            yield conv_node, bn_node, conv, bn
        elif shared is not None:
            shared(conv_node, bn_node)


def _short(name: str, base: str) -> str:
    """``name`` relative to the parent of ``base`` when they share it."""
    parent = base.rpartition(".")[0]
    return name[len(parent) + 1:] if parent and name.startswith(parent + ".") else name


def _added_to(bn_node: fx.Node) -> Optional[fx.Node]:
    """The other operand if bn_node's only user adds it to bn_node (and writes, if in place,
    into bn_node's output only), else None."""
    add = _only_user(bn_node)
    if add is None or add.kwargs or len(add.args) != 2:
        return None
    if add.op == "call_function" and add.target in _ADD_FUNCTIONS:
        target = add.target
    elif add.op == "call_method" and add.target in ("add", "add_"):
        target = add.target
    else:
        return None
    a, b = add.args
    if target in _INPLACE_ADDS or add.op == "call_method":
        other = b if a is bn_node else None  # x.add(y) / x += y: bn must be x
    else:
        other = b if a is bn_node else a if b is bn_node else None
    if not isinstance(other, fx.Node) or other is bn_node:
        return None
    return other
