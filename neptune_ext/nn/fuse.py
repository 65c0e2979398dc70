"""fuse_stages(model): Conv2d -> BatchNorm2d (-> activation) chains, and the residual
tails Conv2d -> BatchNorm2d -> + identity (-> activation), run as one fused layer.

Patterns are found on the torch.fx graph (data flow), not in module order, so
torchvision's ResNet blocks, which call one shared ``relu`` module several times,
are handled: a conv node whose only user is a BatchNorm2d node (whose only user
is an activation: ReLU, ReLU6, SiLU or Hardswish, as a module, a function or a
method, in place or not) is fused.

The trace is used for analysis only. The model keeps its own code and its own
module tree: each fused conv module becomes a :class:`~neptune_ext.nn.stage.FusedConv2d`
in place (same parameters), its BN a pass-through
:class:`~neptune_ext.nn.stage.FusedBatchNorm2d` that keeps its parameters and
buffers, and an activation module used only there a pass-through
(:class:`~neptune_ext.nn.stage.FusedReLU`, ...). A ReLU or ReLU6 that is shared or a
function call stays and reapplies itself to its own output (a no-op); a shared or
functional SiLU/Hardswish (not idempotent) is left out of the fusion (Conv+BN only).
So the fused model has the original's type, attributes, methods and state-dict
keys, and ``if self.training:`` branches, dropout and stochastic depth keep
following ``train()``/``eval()``. Code that the trace would bake a mode into (the
graph differs between train and eval) and code torch.fx cannot trace are not
analysed as a whole: their children are fused one by one.

Residual tails: the add happens in the block's code after its own calls, so the
conv cannot see the identity from inside. For a module whose forward contains
``act(bn(conv(x)) + identity)`` (ResNet's BasicBlock and Bottleneck, RegNet's
blocks), that module instance runs its traced graph with the three nodes replaced
by ``conv(x, identity)``: its ``forward`` becomes the generated code of that graph
(an instance attribute; the class, attributes and state dict stay), which calls
the module's own children. The conv called with one input still returns
``bn(conv(x))``, so the class's own ``forward`` stays correct too. Copies
(``copy.deepcopy``), pickling, ``.to()``/``.half()``, ``load_state_dict``, DDP and
``torch.compile`` see the same modules; ``nn.DataParallel``'s per-device replicas
would call the original device's modules from that instance ``forward`` (an error
about devices, not a wrong result): use DistributedDataParallel.
"""
import ast
import copy
import functools
import inspect
import sys
from collections import Counter
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

import operator

from .stage import (FoldedConv2d, FusedBatchNorm2d, FusedConv2d, FusedHardswish, FusedReLU,
                    FusedReLU6, FusedSiLU, Stage, _explicit_padding)

__all__ = ["fuse_stages"]

# Activation modules (exact types) -> (name, pass-through class); functions and methods -> name.
_ACT_MODULES = {nn.ReLU: ("relu", FusedReLU), nn.ReLU6: ("relu6", FusedReLU6),
                nn.SiLU: ("silu", FusedSiLU), nn.Hardswish: ("hardswish", FusedHardswish)}
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu",
                  F.relu6: "relu6", F.silu: "silu", F.hardswish: "hardswish"}
_ACT_METHODS = {"relu": "relu", "relu_": "relu"}
_IDEMPOTENT = {"relu", "relu6"}  # act(act(x)) == act(x): a shared module may stay and reapply
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_INPLACE_ADDS = {operator.iadd, "add_"}  # write into their first argument


def fuse_stages(model: nn.Module, inplace: bool = False, verbose: bool = False,
                memory_efficient: bool = True) -> nn.Module:
    """Fuse every Conv2d -> BatchNorm2d -> activation chain of ``model`` (ReLU, ReLU6,
    SiLU, Hardswish, or none), and every residual tail Conv2d -> BatchNorm2d -> + identity
    (-> activation).

    Args:
        model: any module, in train or eval mode; the fused model follows later
            ``train()``/``eval()`` calls as the original would (train: batch
            statistics, the fused BN+ReLU kernel; eval: the BN folded into the conv).
        inplace: convert ``model``'s own modules instead of a deep copy's.
        verbose: print what was fused.
        memory_efficient: training keeps each fused conv's input only and recomputes the
            convolution in backward (about half eager's activation memory, one extra
            convolution per step); ``False`` keeps the convolution's output as eager does
            (eager's memory, no recomputation). Each fused conv's ``memory_efficient``
            attribute can be changed later.

    Returns:
        The fused model: the same class as ``model`` with the same state-dict keys
        (a state dict of either loads into the other), with ``fusion_report``: a
        list like ``["layer1.0.conv1+bn1+relu -> Stage", "layer1.0.conv2+bn2+add+relu ->
        Stage+residual", "features.0.0+1 -> Conv+BN"]``.
        Its outputs equal the original's up to floating-point rounding.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report: List[str] = []
    registrations = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    _fuse_residual_tails(model, "", report, registrations)
    _fuse(model, "", report, registrations)
    for m in model.modules():
        if isinstance(m, FusedConv2d):
            m.memory_efficient = bool(memory_efficient)
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


def _conv_bn_pairs(graph: fx.Graph, modules: Dict[str, nn.Module], used_once):
    """(conv node, bn node, conv, bn) for every fusable Conv2d whose only user is a
    BatchNorm2d call on it alone, both modules called and registered once."""
    for conv_node in list(graph.nodes):
        if conv_node.op != "call_module" or not isinstance(modules.get(conv_node.target), nn.Conv2d):
            continue
        bn_node = _only_user(conv_node)
        if (bn_node is None or bn_node.op != "call_module" or bn_node.args != (conv_node,)
                or bn_node.kwargs):
            continue
        conv, bn = modules[conv_node.target], modules.get(bn_node.target)
        # A module called twice shares its weights between two places: leave it.
        if _fusable(conv, bn) and used_once(conv) and used_once(bn):
            yield conv_node, bn_node, conv, bn


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

    for conv_node, bn_node, conv, bn in _conv_bn_pairs(graph, modules, used_once):
        act = _act_of(_only_user(bn_node), bn_node, modules)
        names = f"{prefix}{conv_node.target}+{_short(bn_node.target, conv_node.target)}"
        if act is not None:
            act_name, act_kind, act_module = act
            alone = act_module is not None and used_once(act_module)
            if not alone and act_kind not in _IDEMPOTENT:
                act = None  # it would run a second time on the fused output
        bn.__class__ = FusedBatchNorm2d
        FusedConv2d.convert(conv, bn, activation=None if act is None else act_kind)
        if act is None:
            report.append(f"{names} -> Conv+BN")
            continue
        if alone:
            act_module.__class__ = _ACT_MODULES[type(act_module)][1]
        report.append(f"{names}+{_short(act_name, conv_node.target)} -> Stage")


# ----------------------------------------------------------------------------
# Residual tails: act(bn(conv(x)) + identity) -> conv(x, identity)

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


def _fuse_residual_tails(module: nn.Module, prefix: str, report: List[str],
                         registrations: Counter) -> None:
    """Post-order: the innermost module whose graph holds a residual tail takes it."""
    if isinstance(module, (Stage, FusedConv2d)):
        return
    for name, child in module.named_children():
        _fuse_residual_tails(child, f"{prefix}{name}.", report, registrations)
    if not any(True for _ in module.children()) or "forward" in vars(module):
        return
    graph = _trace(module)
    if graph is None or any(n.op == "get_attr" for n in graph.nodes):
        # (a graph reading the module's own tensors would hold them by reference: a
        # later module.to() that replaces them would leave it stale)
        return
    modules = dict(module.named_modules())
    calls = Counter(id(modules[n.target]) for n in graph.nodes
                    if n.op == "call_module" and n.target in modules)

    def used_once(m: nn.Module) -> bool:
        return calls[id(m)] == 1 and registrations[id(m)] == 1

    tails = []  # (conv node, bn node, add node, activation or None)
    for conv_node, bn_node, conv, bn in _conv_bn_pairs(graph, modules, used_once):
        if len(conv_node.args) != 1 or conv_node.kwargs:
            continue  # (the tail's call passes the conv's input on: one positional argument)
        add_node = _only_user(bn_node)
        if _added_to(bn_node) is None or any(t[2] is add_node for t in tails):
            continue  # (an add of two conv+BN branches is one tail: the first one's)
        tails.append((conv_node, bn_node, add_node, _act_of(_only_user(add_node), add_node, modules)))
    if not tails or not _inplace_safe(graph, _augmented_ops(module)):
        return
    fused = []
    for conv_node, bn_node, add_node, act in tails:
        conv, bn = modules[conv_node.target], modules[bn_node.target]
        identity = _added_to(bn_node)  # now: an earlier rewrite may have replaced the node
        last = add_node if act is None else next(iter(add_node.users))
        with graph.inserting_before(last):
            tail = graph.call_module(conv_node.target, (conv_node.args[0], identity))
        last.replace_all_uses_with(tail)
        for node in ([last, add_node] if act is not None else [add_node]) + [bn_node, conv_node]:
            graph.erase_node(node)
        bn.__class__ = FusedBatchNorm2d
        FusedConv2d.convert(conv, bn, activation=None,
                            residual_activation="none" if act is None else act[1])
        names = f"{prefix}{conv_node.target}+{_short(bn_node.target, conv_node.target)}+add"
        fused.append(names + ("" if act is None else f"+{_short(act[0], conv_node.target)}")
                     + " -> Stage+residual")
    graph.lint()
    code = fx.GraphModule(module, graph, class_name=type(module).__name__ + "Fused")
    # Instance attributes, not children: no new state-dict keys or submodules.
    object.__setattr__(module, "_fused_graph_module", code)
    object.__setattr__(module, "forward", code.forward)
    report.extend(fused)


# ----------------------------------------------------------------------------
# torch.fx records ``a += b`` as ``a + b``: the generated forward would not write into
# ``a``. That is the same computation unless ``a`` (or something derived from it) is read
# after the add. A module whose forward a residual fusion replaces must pass this check.

_AUGMENTED = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
              ast.Pow: operator.pow, ast.MatMult: operator.matmul, ast.BitAnd: operator.and_,
              ast.BitOr: operator.or_, ast.BitXor: operator.xor, ast.LShift: operator.lshift,
              ast.RShift: operator.rshift}


@functools.lru_cache(maxsize=None)
def _augmented_in_source(module_name: str) -> frozenset:
    """The operators of every ``a op= b`` in a Python module's source (all, if unreadable)."""
    try:
        tree = ast.parse(inspect.getsource(sys.modules[module_name]))
    except Exception:  # noqa: BLE001 - no source: assume the worst
        return frozenset(_AUGMENTED.values())
    return frozenset(_AUGMENTED[type(n.op)] for n in ast.walk(tree)
                     if isinstance(n, ast.AugAssign) and type(n.op) in _AUGMENTED)


def _augmented_ops(module: nn.Module) -> set:
    """Operators that an augmented assignment in the code traced for ``module`` (its classes'
    source files, torch.nn's own modules aside) may have been."""
    ops = set()
    for m in module.modules():
        name = type(m).__module__
        if not name.startswith("torch.nn.modules."):
            ops |= _augmented_in_source(name)
    return ops


def _inplace_safe(graph: fx.Graph, ops: set) -> bool:
    """No ``a op b`` (op in ``ops``) whose ``a``, or a node computed from it, is used after it."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in graph.nodes:
        if node.op == "call_function" and node.target in ops and node.args \
                and isinstance(node.args[0], fx.Node):
            stack, seen = [node.args[0]], set()
            while stack:
                for user in stack.pop().users:
                    if user is node or user in seen:
                        continue
                    if order[user] > order[node]:
                        return False
                    seen.add(user)
                    stack.append(user)
    return True
