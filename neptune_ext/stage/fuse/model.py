"""fuse_stages(model): Conv2d -> BatchNorm2d (-> activation) chains, and the residual
tails Conv2d -> BatchNorm2d -> + identity (-> activation), run as one fused layer.

Patterns are found on the torch.fx graph (data flow), not in module order, so
torchvision's ResNet blocks, which call one shared ``relu`` module several times,
are handled: a conv node whose only user is a BatchNorm2d node (whose only user
is an activation: ReLU, ReLU6, SiLU or Hardswish, as a module, a function or a
method, in place or not) is fused.

The trace is used for analysis only: the model keeps its own class and its own code.
What changes is which modules its parents hold. Each fused conv is replaced, in its parent
and under its name, by a new :class:`~neptune_ext.stage.module.FusedConv2d` holding the very
same weight (and bias) tensors; its BN by a pass-through
:class:`~neptune_ext.stage.passthrough.FusedBatchNorm2d` holding the BN's very parameters
and buffers; an activation module used only there by a pass-through
(:class:`~neptune_ext.stage.passthrough.FusedReLU`, ...); see
``stage.passthrough.rebuilt_as``. No module changes class: the modules taken out are left as
they were (sharing the tensors). A ReLU or ReLU6 that is shared or a function call stays and
reapplies itself to its own output (a no-op); a shared or functional SiLU/Hardswish (not
idempotent) is left out of the fusion (Conv+BN only). So the fused model has the original's
type, attributes, methods, parameter names and state-dict keys, an optimizer built before
fusing trains it, ``print(model)`` shows the fused modules, and ``if self.training:``
branches, dropout and stochastic depth keep following ``train()``/``eval()``. Code that the
trace would bake a mode into (the graph differs between train and eval) and code torch.fx
cannot trace are not analysed as a whole: their children are fused one by one.

The fused conv computes with its BN, which it holds as its child ``bn`` (so ``print`` shows
it inside the conv) rather than as a plain attribute: ``nn.DataParallel``'s replicas copy
attributes as they are and rebind children only, so a replica computes with its own BN.
The BN's home stays its parent: the conv leaves it out of ``named_modules``/``children``
(and so of ``parameters``, ``buffers``, ``apply``, ``to``, ``train``) and of its state dict.

Residual tails: the add happens in the block's code after its own calls, so the conv cannot
see the identity from inside. For a module whose forward contains ``act(bn(conv(x)) +
identity)`` (ResNet's BasicBlock and Bottleneck, RegNet's blocks), its traced graph with the
three nodes replaced by ``conv(x, identity)`` is what a
:class:`~neptune_ext.stage.fuse.block.FusedBlock` runs (``FusedCode``: the graph compiled to
Python, holding no module); the FusedBlock, of a generated subclass of the block's class that
changes only ``forward``, takes the block's place in its parent and holds
the block's children, parameters, buffers, hooks and attributes, the same objects under the
same names. ``print(model)`` names it ``BasicBlockFused``; ``block.fused_code.source`` is its
code. (The conv called with one input still returns ``bn(conv(x))``, as the block's
class's forward expects.) The model's root
cannot be replaced (it is what ``fuse_stages`` returns): if it holds tails itself, its
``forward`` runs the rewritten code.

The root's ``forward`` is an instance attribute, a ``layout.CallerLayout``: the CPU's
channels_last conversion (see ``fuse_stages``) and the root's own tails. It stays an
instance attribute because the model must keep its class (a wrapper would change it) and a
call that fails on channels_last tensors is run again in NCHW, which forward hooks cannot
do. The root also gets ``_replicate_for_data_parallel``, so that each ``nn.DataParallel``
replica gets a CallerLayout of its own.

What this costs: a replaced block's forward is not its class's (its signature is
``(*args, **kwargs)``; ``isinstance``, the class's other methods, class attributes and
properties hold: ``block.block_class`` is the class). References to modules held from before
fusing with ``inplace=True`` point at the modules taken out: they share the model's tensors
but are no longer part of it (a conv, BN or activation taken out computes its unfused
result). For that reason a module that the model also holds in a plain attribute, or in a
list, tuple, set or dict one, counts as used twice and is left unfused. Copies
(``copy.deepcopy``), pickling, ``.to()``/``.half()``, ``load_state_dict``, DDP,
``nn.DataParallel`` and ``torch.compile`` see the fused modules.

Not supported on a fused model: ``torch.jit.trace``/``script``, ``torch.fx.symbolic_trace``
and ``torch.export`` (the root's forward is a ``CallerLayout`` object; use ``torch.compile``,
or export the unfused model). Replacing BN modules after fusing
(``nn.SyncBatchNorm.convert_sync_batchnorm``, a swap to ``FrozenBatchNorm2d``) replaces only
the pass-through while the fused conv keeps computing with the BN it was fused with, so
the BN would apply twice: convert before ``fuse_stages``. When the model's code fails on
channels_last tensors (the CPU's NCHW -> channels_last conversion, see ``fuse_stages``),
that first call runs again in NCHW: writes into its tensor inputs are undone first, but
its other side effects (hooks, attributes it appends to) happen twice on that one call.

What must stay as it was (``fuse/checks.py``; a block that fails a check stays unfused
and is listed in ``fusion_skipped`` with the reason):

- hooks: a conv or BN with hooks (or an activation with hooks: then Conv+BN only), and
  every chain while global module hooks are registered;
- attributes set in forward (``self.feat = out``, seen in the source or in what the trace
  changed): no chain inside that forward, and no rewritten forward for it or its parents
  up to the block whose forward would be rewritten (the trace would lose the store); the
  trace's own stores (stale torch.fx Proxies) are undone;
- the order of in-place writes: a residual tail moves the conv and the BN to the add, so
  no write into the conv's input or the identity (``relu_``, ``mul_``, ``inplace=True``,
  ``x[i] = ``, ``a op= b``, an unknown call) may come after the conv; and since the traced
  code records ``a op= b`` out of place, no such op may write into an input of the
  forward (the caller's tensor) or into memory read again afterwards;
- chains whose conv or BN parameters are read in the forward's own code.
"""
import copy
from collections import Counter
from typing import Dict, List, Optional

from torch import fx, nn

from . import checks, layout as fuse_layout
from .block import FusedBlock, FusedCode
from .patterns import (_ACT_MODULES, _IDEMPOTENT, _act_of, _added_to, _conv_bn_pairs,
                            _only_user, _short)
from ..module import FusedConv2d, Stage
from ..passthrough import FusedBatchNorm2d, rebuilt_as

__all__ = ["fuse_stages"]


def fuse_stages(model: nn.Module, inplace: bool = False, verbose: bool = False,
                memory_efficient: bool = False) -> nn.Module:
    """Fuse every Conv2d -> BatchNorm2d -> activation chain of ``model`` (ReLU, ReLU6,
    SiLU, Hardswish, or none), and every residual tail Conv2d -> BatchNorm2d -> + identity
    (-> activation).

    Args:
        model: any module, in train or eval mode; the fused model follows later
            ``train()``/``eval()`` calls as the original would (train: batch
            statistics, the fused BN+ReLU kernel; eval: the BN folded into the conv).
        inplace: fuse ``model`` itself (its parents get the new modules) instead of a
            deep copy.
        verbose: print what was fused, and what was left unfused and why.
        memory_efficient: the training trade. ``False`` (default): each fused conv keeps
            its output for backward as eager does (eager's activation memory, eager's step
            time or less). ``True``: it keeps its input only and recomputes the convolution
            in backward: ResNet-18, batch 8, 224², 2-core CPU: 0.58x eager's saved
            activations for ~1.4x eager's step time (one extra convolution per fused conv).
            Each fused conv's ``memory_efficient`` attribute can be changed later.

    Returns:
        The fused model (``model`` itself with ``inplace=True``): the same class as
        ``model`` with the same parameter names and state-dict keys (a state dict of either
        loads into the other), whose parents hold new modules sharing the fused ones'
        tensors: a FusedConv2d in place of each fused conv, a pass-through in place of its
        BN (and activation), a FusedBlock in place of a block with residual tails (see the
        module's documentation for what that costs); with ``fusion_report``: a
        list like ``["layer1.0.conv1+bn1+relu -> Stage", "layer1.0.conv2+bn2+add+relu ->
        Stage+residual", "features.0.0+1 -> Conv+BN"]``, and ``fusion_skipped``: the
        chains and residual tails left as they were, each with the reason, like
        ``["layer1.0.conv2+bn2+add -> unfused: relu_ on x writes into the identity after
        the conv reads it"]`` (see the module's documentation for the rules).
        Its outputs equal the original's up to floating-point rounding, and it keeps
        what the original does besides: in-place writes into its inputs, attributes
        set in forward, hooks.

    On the CPU in eval, a model called with NCHW float32/bfloat16 input runs its fused
    convolutions in channels_last (oneDNN's fast layout, weights packed once per fold): the
    first fused conv converts, the layers after it stay channels_last, and the 4-D tensors
    the model returns come back in NCHW (see ``neptune_ext/stage/fuse/layout.py``; the model's
    ``forward`` is an instance attribute that does this). In between, the model's own code
    sees channels_last tensors (equal values); code that fails on them (``x.view(n, -1)`` of
    a feature map) is run again in NCHW and the model stays NCHW (``fusion_layout``).

    Hooks registered *after* fusion on a fused conv, its BN or a fused activation module
    see the fused values: the conv's output is already ``activation(bn(conv(x)))``; the BN
    (and a fused activation module) pass it through unchanged. Register hooks before
    fusing (those chains then stay unfused) or on modules outside the chains.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report: List[str] = []
    skipped: List[str] = []
    if checks.global_hooks():
        skipped.append("(all) -> unfused: global module hooks are registered "
                       "(torch.nn.modules.module.register_module_*_hook)")
    else:
        registrations = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        registrations.update(checks.plain_references(model))
        root_code = _fuse_residual_tails(model, "", report, registrations, skipped)
        _fuse(model, "", report, registrations, skipped)
    fused_convs = [m for m in model.modules() if isinstance(m, FusedConv2d)]
    for m in fused_convs:
        m.memory_efficient = bool(memory_efficient)
    if fused_convs:
        fuse_layout.install(model, root_code)
    model.fusion_report = report
    model.fusion_skipped = list(dict.fromkeys(skipped))
    if verbose:
        print(f"fuse_stages: {len(report)} fusion(s), {len(model.fusion_skipped)} left unfused")
        for line in report + model.fusion_skipped:
            print("  " + line)
    return model


class _Tracer(fx.Tracer):
    record_stack_traces = True  # (which source line each node comes from: a += b or a + b)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (Stage, FusedConv2d)) or super().is_leaf_module(m, qualname)


def _trace(module: nn.Module):
    """``(graph, writers)``: the module's graph if torch.fx can trace it the same way in
    train and eval mode (else None), and {qualified name: what it sets} of the modules
    whose forward sets attributes (see checks.writers). Whatever the trace stored in
    the modules (torch.fx Proxies in ``self.feat``) is undone. A FusedBlock's graph is the
    one it runs (traced when its tails were fused; nothing under it sets attributes, or they
    would not have been)."""
    if isinstance(module, FusedBlock):
        return module.fused_code.graph, {}
    modes = {m: m.training for m in module.modules()}
    recorder = checks.AttributeRecorder(module)
    graphs = []
    try:
        for mode in (True, False):
            module.train(mode)
            graphs.append(_Tracer().trace(module))
    except Exception:  # noqa: BLE001 - untraceable (data-dependent control flow, ...)
        graphs = None
    finally:
        for m, mode in modes.items():
            m.training = mode
        changed = recorder.restore()
    writers = checks.writers(module, changed)
    if graphs is None or _signature(graphs[0]) != _signature(graphs[1]):
        return None, writers  # (the code depends on the mode: a trace would freeze it)
    return graphs[0], writers


def _signature(graph: fx.Graph):
    return [(n.op, str(n.target), str(n.args), str(n.kwargs)) for n in graph.nodes]


def _fuse(module: nn.Module, prefix: str, report: List[str], registrations: Counter,
          skipped: List[str]) -> None:
    if isinstance(module, (Stage, FusedConv2d)) or not any(True for _ in module.children()):
        return
    graph, writers = _trace(module)
    if graph is None:
        for name, child in module.named_children():
            _fuse(child, f"{prefix}{name}.", report, registrations, skipped)
        return
    _rewrite(module, graph, prefix, report, registrations, skipped, writers)


def _hooked(names: str, prefix: str, mods) -> Optional[str]:
    """'unfused' reason if any of ``mods`` ({name under prefix: module}) has hooks, else None."""
    found = [f"{kind}s on {prefix}{name}" for name, m in mods.items() if m is not None
             for kind in checks.hooks_of(m)]
    return f"{names} -> unfused: {', '.join(found)} (would see fused values)" if found else None


def _param_reads(graph: fx.Graph, *targets: str) -> bool:
    """Whether the graph reads a parameter or buffer of one of these modules itself."""
    return any(n.op == "get_attr" and any(str(n.target).startswith(t + ".") for t in targets)
               for n in graph.nodes)


def _rewrite(root: nn.Module, graph: fx.Graph, prefix: str, report: List[str],
             registrations: Counter, skipped: List[str], writers: Dict[str, str]) -> None:
    modules = dict(root.named_modules())
    calls = Counter(id(modules[n.target]) for n in graph.nodes
                    if n.op == "call_module" and n.target in modules)

    def used_once(m: nn.Module) -> bool:
        # Called once in this graph and registered once in the whole model.
        return calls[id(m)] == 1 and registrations[id(m)] == 1

    def shared(conv_node, bn_node):
        skipped.append(f"{prefix}{conv_node.target}+{_short(bn_node.target, conv_node.target)} -> "
                       "unfused: the conv or its BN is called, or held, at more than one place")

    for conv_node, bn_node, conv, bn in _conv_bn_pairs(graph, modules, used_once, shared):
        act = _act_of(_only_user(bn_node), bn_node, modules)
        names = f"{prefix}{conv_node.target}+{_short(bn_node.target, conv_node.target)}"
        nodes = [conv_node, bn_node] + ([] if act is None else [_only_user(bn_node)])
        chain = names if act is None else f"{names}+{_short(act[0], conv_node.target)}"
        writer = next((w for w in writers if any(checks.inside(n, w) for n in nodes)), None)
        if writer is not None:
            where = prefix + writer if writer else (prefix[:-1] or "the model")
            skipped.append(f"{chain} -> unfused: the forward of {where} sets {writers[writer]} "
                           "(a fused chain could change what it stores)")
            continue
        if _param_reads(graph, conv_node.target, bn_node.target):
            skipped.append(f"{chain} -> unfused: the forward reads the conv's or BN's "
                           "parameters or buffers itself")
            continue
        hooked = _hooked(chain, prefix, {conv_node.target: conv, bn_node.target: bn})
        if hooked:
            skipped.append(hooked)
            continue
        if act is not None:
            act_name, act_kind, act_module = act
            hooked = _hooked(chain, prefix, {act_name: act_module})
            if hooked:
                skipped.append(hooked.replace("-> unfused:", "-> activation not fused:"))
                act = None
        if act is not None:
            alone = act_module is not None and used_once(act_module)
            if not alone and act_kind not in _IDEMPOTENT:
                act = None  # it would run a second time on the fused output
        _replace_chain(root, conv_node.target, bn_node.target, conv, bn,
                       activation=None if act is None else act_kind)
        if act is None:
            report.append(f"{names} -> Conv+BN")
            continue
        if alone:
            _replace(root, act_name, rebuilt_as(act_module, _ACT_MODULES[type(act_module)][1]))
        report.append(f"{names}+{_short(act_name, conv_node.target)} -> Stage")


# ----------------------------------------------------------------------------
# Residual tails: act(bn(conv(x)) + identity) -> conv(x, identity)

def _replace(root: nn.Module, target: str, new: nn.Module) -> None:
    """Register ``new`` in place of the module ``target`` (a dotted name under ``root``): in
    its parent, under the same name."""
    parent, _, name = target.rpartition(".")
    root.get_submodule(parent)._modules[name] = new


def _replace_chain(root: nn.Module, conv_target: str, bn_target: str, conv, bn,
                   activation: Optional[str], residual_activation: Optional[str] = None) -> None:
    """The conv and its BN replaced in their parents by a FusedConv2d and a pass-through
    FusedBatchNorm2d sharing their tensors (the conv's child ``bn``: see FusedConv2d)."""
    passthrough = rebuilt_as(bn, FusedBatchNorm2d)
    _replace(root, conv_target, FusedConv2d.convert(conv, passthrough, activation=activation,
                                                    residual_activation=residual_activation))
    _replace(root, bn_target, passthrough)


def _fuse_residual_tails(module: nn.Module, prefix: str, report: List[str],
                         registrations: Counter, skipped: List[str]) -> Optional[FusedCode]:
    """Post-order: the innermost module whose graph holds a residual tail takes it. Returns
    the module's rewritten forward if it has one (the root runs it from its CallerLayout);
    a child that has one is replaced in ``module`` by a FusedBlock running it."""
    if isinstance(module, (Stage, FusedConv2d, FusedBlock)):
        return None
    for name, child in list(module.named_children()):
        code = _fuse_residual_tails(child, f"{prefix}{name}.", report, registrations, skipped)
        if code is not None:
            module._modules[name] = FusedBlock.of(child, code)
    if not any(True for _ in module.children()) or "forward" in vars(module):
        return None
    graph, writers = _trace(module)
    if graph is None or any(n.op == "get_attr" for n in graph.nodes):
        # (a graph reading the module's own tensors would hold them by reference: a
        # later module.to() that replaces them would leave it stale)
        return None
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
    tails = _safe_tails(module, graph, modules, tails, prefix, writers, skipped)
    if not tails:
        return None
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
        _replace_chain(module, conv_node.target, bn_node.target, conv, bn, activation=None,
                       residual_activation="none" if act is None else act[1])
        fused.append(_tail_names(prefix, conv_node, bn_node, act) + " -> Stage+residual")
    graph.lint()
    report.extend(fused)
    return FusedCode(graph)


def _tail_names(prefix: str, conv_node, bn_node, act) -> str:
    names = f"{prefix}{conv_node.target}+{_short(bn_node.target, conv_node.target)}+add"
    return names + ("" if act is None else f"+{_short(act[0], conv_node.target)}")


def _safe_tails(module: nn.Module, graph: fx.Graph, modules, tails, prefix: str,
                writers: Dict[str, str], skipped: List[str]) -> list:
    """The tails whose rewrite keeps the forward's reads, writes and side effects (see the
    module doc); each other one goes into ``skipped`` with the reason."""
    if not tails:
        return []
    names = [_tail_names(prefix, c, b, a) for c, b, _, a in tails]
    if writers:
        where = ", ".join(f"{(prefix + w) if w else (prefix[:-1] or 'the model')} sets {what}"
                          for w, what in writers.items())
        skipped.extend(f"{n} -> unfused: the traced forward would drop what forward does besides "
                       f"computing ({where})" for n in names)
        return []
    augmented = checks.augmented_nodes(graph, module)
    roots = checks.alias_roots(graph, modules, augmented)
    problem = checks.augmented_write_problem(graph, modules, augmented, roots)
    if problem:
        skipped.extend(f"{n} -> unfused: {problem}" for n in names)
        return []
    safe = []
    for (conv_node, bn_node, add_node, act), name in zip(tails, names):
        identity = _added_to(bn_node)
        hooked = _hooked(name, prefix, {conv_node.target: modules[conv_node.target],
                                bn_node.target: modules[bn_node.target],
                                **({} if act is None or act[2] is None else {act[0]: act[2]})})
        if hooked:
            skipped.append(hooked)
            continue
        # The rewrite reads the conv's input and the identity where the add (or the
        # activation) was: nothing may write into them after the conv. (The tail's own add
        # and activation are replaced by it: their writes, into the identity if it is ``a``
        # of ``a += ...``, happen after those reads anyway, and augmented_write_problem
        # has checked that nothing reads that memory again.)
        targets = roots[conv_node.args[0]] | roots[identity]
        own = {add_node} | ({next(iter(add_node.users))} if act is not None else set())
        write = checks.first_write_into(targets, conv_node, graph, modules, augmented, roots,
                                        skip=own)
        if write is not None:
            skipped.append(f"{name} -> unfused: {checks.describe(write, prefix)} writes into the conv's "
                           "input or the identity after the conv reads it")
            continue
        safe.append((conv_node, bn_node, add_node, act))
    return safe
