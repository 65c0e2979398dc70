"""What ``fuse_stages`` must see before it rewrites a block: hooks, attributes that forward
sets, and the order of in-place writes (see ``fuse.py``). Each check is conservative: when
it cannot prove that a rewrite keeps what the user observes, the block stays unfused and
the reason goes into the model's ``fusion_skipped``.

Aliasing on the torch.fx graph: every node gets the set of "roots" whose memory its value
may share. A node known to return a fresh tensor (a convolution, a BatchNorm, an
out-of-place arithmetic op, ...) is its own root; anything else (views, ``contiguous``,
``to``, in-place ops that return their input, unknown calls) may alias each of its tensor
arguments. All inputs of the traced forward share one root: a caller may pass the same
tensor, or views of one tensor, twice.
"""
import ast
import functools
import inspect
import linecache
import operator
import re
import sys
import textwrap
from collections import Counter
from typing import Dict, FrozenSet, List, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from .block import FusedBlock
from ..module import FusedConv2d, Stage
from ..passthrough import FusedBatchNorm2d, _PassThrough

INPUTS = "<inputs>"  # the one root of every placeholder

_HOOKS = (("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook"),
          ("_backward_pre_hooks", "backward pre-hook"), ("_backward_hooks", "backward hook"))


def hooks_of(module: nn.Module) -> List[str]:
    """The kinds of hooks registered on ``module`` (empty: none)."""
    return [kind for attr, kind in _HOOKS if getattr(module, attr, None)]


def global_hooks() -> bool:
    """Whether hooks for every module are registered (``register_module_forward_hook``...)."""
    from torch.nn.modules import module as m
    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
             "_global_backward_pre_hooks", "_global_forward_hooks_always_called")
    return any(bool(getattr(m, name, None)) for name in names)


# ----------------------------------------------------------------------------
# Modules held outside the module tree

_MODULE_STATE = frozenset(vars(nn.Module()))  # (nn.Module's own bookkeeping: children, hooks...)


def plain_references(root: nn.Module) -> Counter:
    """How many times each module (by id) is held by a module of ``root`` outside its
    registered children: a plain attribute, or an item of a list, tuple, set or dict one.
    fuse_stages replaces modules in their parents: such a reference would keep calling the
    unfused module, so it counts as one more place the module is used."""
    found = Counter()
    for m in root.modules():
        for key, value in vars(m).items():
            if key in _MODULE_STATE:
                continue
            items = value.values() if isinstance(value, dict) else \
                value if isinstance(value, (list, tuple, set)) else (value,)
            found.update(id(v) for v in items if isinstance(v, nn.Module))
    return found


# ----------------------------------------------------------------------------
# Attributes set in forward (``self.feat = out``): invisible to torch.fx, and a trace stores
# a Proxy there.

_CONTAINER_MUTATORS = {"append", "extend", "insert", "update", "setdefault", "add", "pop",
                       "clear", "remove", "__setitem__"}


def _rooted_at(node: ast.AST, name: str) -> bool:
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return isinstance(node, ast.Name) and node.id == name


@functools.lru_cache(maxsize=None)
def attribute_writes(cls: type) -> tuple:
    """What the source of ``cls.forward`` sets or mutates through ``self`` (``self.x = ``,
    ``self.x[k] = ``, ``self.x += ``, ``self.x.append(...)``, ``setattr(self, ...)``) or
    declares ``global``/``nonlocal``, as written there; empty if nothing or the source is
    unavailable (then the trace's own record of changed attributes decides)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except Exception:  # noqa: BLE001 - builtin, generated or source-less code
        return ()
    func = tree.body[0] if tree.body and isinstance(tree.body[0], (ast.FunctionDef,
                                                                     ast.AsyncFunctionDef)) else None
    if func is None or not func.args.args:
        return ()
    me = func.args.args[0].arg
    names = []

    def target_name(t):
        while isinstance(t, ast.Subscript):
            t = t.value
        return t.attr if isinstance(t, ast.Attribute) else "?"

    for node in ast.walk(func):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = [node.target] if not isinstance(node, ast.Delete) else node.targets
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            names.extend(f"{type(node).__name__.lower()} {n}" for n in node.names)
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in ("setattr", "delattr") and node.args \
                    and _rooted_at(node.args[0], me):
                names.append(f"{f.id}(self, ...)")
            elif isinstance(f, ast.Attribute) and f.attr in _CONTAINER_MUTATORS \
                    and isinstance(f.value, (ast.Attribute, ast.Subscript)) and _rooted_at(f.value, me):
                names.append(f"self.{target_name(f.value)}.{f.attr}(...)")
        for t in targets:
            for el in (t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t]):
                if isinstance(el, (ast.Attribute, ast.Subscript)) and _rooted_at(el, me):
                    names.append(f"self.{target_name(el)}")
    return tuple(dict.fromkeys(names))


class AttributeRecorder:
    """Snapshots every module's attributes (and its parameter, buffer and child dicts, and
    the lists/dicts/sets it holds) before a trace; :meth:`restore` puts them back after it
    and returns the modules whose forward changed them."""

    def __init__(self, root: nn.Module):
        self.saved = []
        for m in root.modules():
            d = m.__dict__
            inner = {k: (v, _copy_container(v)) for k, v in d.items()
                     if isinstance(v, (list, dict, set))}
            self.saved.append((m, dict(d), inner))

    def restore(self) -> List[nn.Module]:
        changed = []
        for m, d, inner in self.saved:
            now = m.__dict__
            dirty = set(now) != set(d) or any(now[k] is not v for k, v in d.items())
            for k, (obj, copy) in inner.items():
                if _container_changed(obj, copy):
                    dirty = True
                    _restore_container(obj, copy)
            if dirty:
                changed.append(m)
                now.clear()
                now.update(d)
        return changed


def _copy_container(v):
    if isinstance(v, list):
        return list(v)
    if isinstance(v, dict):
        return list(v.items())
    return set(v)


def _container_changed(obj, copy) -> bool:
    if isinstance(obj, list):
        return len(obj) != len(copy) or any(a is not b for a, b in zip(obj, copy))
    if isinstance(obj, dict):
        items = list(obj.items())
        return len(items) != len(copy) or any(a[0] != b[0] or a[1] is not b[1]
                                               for a, b in zip(items, copy))
    return obj != copy


def _restore_container(obj, copy) -> None:
    if isinstance(obj, list):
        obj[:] = copy
    else:
        obj.clear()
        obj.update(copy)


def writers(root: nn.Module, changed: List[nn.Module]) -> Dict[str, str]:
    """{qualified name: what it sets} of the modules under ``root`` whose forward sets
    attributes: seen in the trace (``changed``) or in the source of their class's forward
    (torch.nn's own modules, Stages and fused convs aside)."""
    out = {}
    changed_ids = {id(m) for m in changed}
    for name, m in root.named_modules():
        if isinstance(m, (Stage, FusedConv2d, FusedBlock)) or "forward" in vars(m):
            continue  # (leaves of the trace; a rewritten forward of ours sets nothing)
        found = []
        if not type(m).__module__.startswith("torch.nn.modules."):
            found = list(attribute_writes(type(m)))
        if id(m) in changed_ids and not found:
            found = ["attributes"]
        if found:
            out[name] = ", ".join(found)
    return out


def inside(node: fx.Node, qualname: str) -> bool:
    """Whether ``node`` was recorded by the code of module ``qualname``'s own forward (the
    root: ``""``), where that forward can see (and store) its value; without torch.fx's
    module stack: assume so. Values computed inside a child reach the forward only as the
    child's output, which a fusion inside the child does not change."""
    stack = node.meta.get("nn_module_stack")
    if stack is None:
        return True
    keys = list(stack)
    if node.op == "call_module":
        keys = keys[:-1]  # (the module called is the stack's last entry)
    return (keys[-1] if keys else "") == qualname


# ----------------------------------------------------------------------------
# Aliasing and in-place writes on the graph

# Modules (exact types) and calls known to return a fresh tensor.
_FRESH_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear, nn.BatchNorm1d,
                  nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm, nn.MaxPool2d,
                  nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish,
                  nn.Sigmoid, nn.Hardsigmoid, nn.GELU, nn.Tanh, nn.Softmax, Stage, FusedConv2d)
_FRESH_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
                    operator.matmul, torch.add, torch.sub, torch.mul, torch.cat, torch.stack,
                    torch.relu, torch.sigmoid, torch.tanh, torch.conv2d,
                    F.relu, F.relu6, F.silu, F.hardswish, F.gelu, F.sigmoid, F.conv2d,
                    F.batch_norm, F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d, F.linear}
_FRESH_METHODS = {"add", "sub", "mul", "div", "relu", "sigmoid", "tanh", "sum", "mean", "clone",
                  "softmax", "matmul", "pow", "sqrt", "exp"}
_MUTATING_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__",
                     "__ior__", "__iand__"}


def _node_args(node: fx.Node) -> List[fx.Node]:
    found = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n))
    return found


def _inplace_flag(node: fx.Node) -> bool:
    """Whether a call_function passes ``inplace=True`` (by name or position)."""
    if node.kwargs.get("inplace") is True:
        return True
    try:
        sig = inspect.signature(node.target)
    except (TypeError, ValueError):
        return any(a is True for a in node.args[1:])
    if "inplace" not in sig.parameters:
        return False
    try:
        bound = sig.bind_partial(*node.args, **node.kwargs)
    except TypeError:
        return any(a is True for a in node.args[1:])
    return bound.arguments.get("inplace") is True


def mutated_args(node: fx.Node, modules: Dict[str, nn.Module], augmented: set) -> List[fx.Node]:
    """The nodes whose tensors ``node`` may write into: in-place ops (``relu_``, ``x.mul_()``,
    ``inplace=True``, ``out=``, ``x[i] = v``), modules with ``inplace`` set, an
    ``a op b`` that may have been ``a op= b`` (``augmented``: torch.fx records those out of
    place; see :func:`augmented_nodes`) and calls this module knows nothing of (all their
    tensor arguments)."""
    args = node.args
    first = [args[0]] if args and isinstance(args[0], fx.Node) else []
    if "out" in node.kwargs:
        return _node_args(node)
    if node.op == "call_module":
        m = modules.get(node.target)
        return first if getattr(m, "inplace", False) is True else []
    if node.op == "call_method":
        name = node.target
        if name in _MUTATING_DUNDERS or (name.endswith("_") and not name.startswith("__")):
            return first
        return []
    if node.op == "call_function":
        t = node.target
        if node in augmented or t is operator.setitem:
            return first
        name = getattr(t, "__name__", "")
        if name.endswith("_") and not name.startswith("__"):
            return first
        if _inplace_flag(node):
            return first
        owner = getattr(t, "__module__", None) or ""
        if owner.startswith(("torch", "_operator", "operator", "math", "builtins")) \
                or t in (getattr, len, isinstance):
            return []
        return _node_args(node)  # a wrapped user function: assume it writes anything it gets
    return []


def alias_roots(graph: fx.Graph, modules: Dict[str, nn.Module], augmented: set
                ) -> Dict[fx.Node, FrozenSet]:
    roots: Dict[fx.Node, FrozenSet] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            roots[node] = frozenset([INPUTS])
            continue
        fresh = False
        if node.op == "call_module":
            m = modules.get(node.target)
            fresh = (type(m) in _FRESH_MODULES or isinstance(m, (Stage, FusedConv2d))) \
                and not isinstance(m, (FusedBatchNorm2d, _PassThrough)) \
                and getattr(m, "inplace", False) is not True
        elif node.op == "call_function":
            fresh = node.target in _FRESH_FUNCTIONS and node not in augmented \
                and not _inplace_flag(node) and "out" not in node.kwargs
        elif node.op == "call_method":
            fresh = node.target in _FRESH_METHODS
        own = frozenset([node])
        if fresh:
            roots[node] = own
        elif node.op == "call_function" and node in augmented and node.args \
                and isinstance(node.args[0], fx.Node) and node.target in _FRESH_FUNCTIONS:
            roots[node] = own | roots[node.args[0]]  # a op b, or a op= b: a itself
        else:
            roots[node] = own.union(*(roots.get(a, frozenset([a])) for a in _node_args(node)))
    return roots


def describe(node: fx.Node, prefix: str = "") -> str:
    """The write, for a report line (module names qualified with ``prefix``)."""
    if node.op == "call_module":
        return f"{prefix}{node.target} (in place)"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "?")
    return f"{target} on {node.args[0] if node.args else '?'}"


def first_write_into(targets: FrozenSet, after: fx.Node, graph: fx.Graph, modules, augmented,
                     roots, skip=()) -> Optional[fx.Node]:
    """The first node after ``after`` that may write into memory of ``targets`` (roots)."""
    started = False
    for node in graph.nodes:
        if node is after:
            started = True
            continue
        if not started or node in skip:
            continue
        for a in mutated_args(node, modules, augmented):
            if roots.get(a, frozenset([a])) & targets:
                return node
    return None


def augmented_write_problem(graph: fx.Graph, modules, augmented, roots) -> Optional[str]:
    """Running the traced code instead of the module's source turns each ``a op= b`` into
    ``a op b``: the write into ``a`` is lost. That is harmless only if ``a``'s memory is the
    forward's own (not an input's: the caller would no longer see the write) and no tensor
    sharing it, computed before, is read after. The reason if not, else None."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in graph.nodes:
        if node.op != "call_function" or node not in augmented or not node.args \
                or not isinstance(node.args[0], fx.Node):
            continue
        written = roots[node.args[0]]
        if INPUTS in written:
            return (f"'{node.args[0]} {_SYMBOL.get(node.target, '?')}= ...' may write into "
                    f"an input (torch.fx records it out of place)")
        for other, r in roots.items():
            if other is node or order[other] > order[node] or not (r & written):
                continue
            if any(order[u] > order[node] for u in other.users):
                return (f"'{node.args[0]} {_SYMBOL.get(node.target, '?')}= ...' may write into "
                        f"a tensor read later (torch.fx records it out of place)")
    return None


_SYMBOL = {operator.add: "+", operator.sub: "-", operator.mul: "*", operator.truediv: "/",
           operator.floordiv: "//", operator.mod: "%", operator.pow: "**", operator.matmul: "@",
           operator.and_: "&", operator.or_: "|", operator.xor: "^", operator.lshift: "<<",
           operator.rshift: ">>"}


# ----------------------------------------------------------------------------
# torch.fx records ``a += b`` as ``a + b`` (a Proxy has no ``__iadd__``): code generated from
# the graph would not write into ``a``. Which nodes may have been augmented assignments: the
# source line each node was traced from (torch.fx's stack trace) holds one with that
# operator; without a stack trace or source, every such operator anywhere in the source
# files of the traced classes counts.

_AUGMENTED = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
              ast.Pow: operator.pow, ast.MatMult: operator.matmul, ast.BitAnd: operator.and_,
              ast.BitOr: operator.or_, ast.BitXor: operator.xor, ast.LShift: operator.lshift,
              ast.RShift: operator.rshift}
_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


@functools.lru_cache(maxsize=None)
def _augmented_lines(filename: str):
    """{(line, operator)} of every line an ``a op= b`` of the file spans, or None if the file
    cannot be read."""
    try:
        tree = ast.parse("".join(linecache.getlines(filename)) or open(filename).read())
    except Exception:  # noqa: BLE001
        return None
    return frozenset((line, _AUGMENTED[type(n.op)]) for n in ast.walk(tree)
                     if isinstance(n, ast.AugAssign) and type(n.op) in _AUGMENTED
                     for line in range(n.lineno, (n.end_lineno or n.lineno) + 1))


@functools.lru_cache(maxsize=None)
def _augmented_in_module(module_name: str) -> frozenset:
    """The operators of every ``a op= b`` in a Python module's source (all, if unreadable)."""
    try:
        tree = ast.parse(inspect.getsource(sys.modules[module_name]))
    except Exception:  # noqa: BLE001 - no source: assume the worst
        return frozenset(_AUGMENTED.values())
    return frozenset(_AUGMENTED[type(n.op)] for n in ast.walk(tree)
                     if isinstance(n, ast.AugAssign) and type(n.op) in _AUGMENTED)


def _source_line(node: fx.Node):
    """(file, line) of the user code that recorded ``node``, or None."""
    frames = [(f, int(n)) for f, n in _FRAME.findall(node.stack_trace or "")
              if "/torch/fx/" not in f and "/torch/nn/modules/module.py" not in f]
    return frames[-1] if frames else None


def augmented_nodes(graph: fx.Graph, root: nn.Module) -> set:
    """The call_function nodes of ``graph`` that may have been ``a op= b``."""
    fallback = None
    out = set()
    ops = set(_AUGMENTED.values())
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in ops:
            continue
        where = _source_line(node)
        lines = _augmented_lines(where[0]) if where else None
        if lines is not None:
            if (where[1], node.target) in lines:
                out.add(node)
            continue
        if fallback is None:
            fallback = set()
            for m in root.modules():
                if not type(m).__module__.startswith("torch.nn.modules."):
                    fallback |= _augmented_in_module(type(m).__module__)
        if node.target in fallback:
            out.add(node)
    return out
