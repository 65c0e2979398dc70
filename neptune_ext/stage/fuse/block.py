"""What a module whose forward holds residual tails runs after ``fuse_stages``: its traced
graph with each ``act(bn(conv(x)) + identity)`` replaced by ``conv(x, identity)``
(:class:`FusedCode`), in a module of a subclass of the block's class that takes the block's
place in its parent (:class:`FusedBlock`); the model's root keeps its class and runs the code from its
``forward`` (``layout.CallerLayout``)."""
import hashlib
import linecache

from torch import fx, nn

from ..passthrough import rebuilt_as

__all__ = ["FusedCode", "FusedBlock", "fused_class"]


class FusedCode:
    """A block's rewritten forward: ``code(module, *args, **kwargs)`` runs ``graph`` (an
    ``fx.Graph``) with ``module`` as ``self``, calling the children it names at call time.
    It holds no module and no tensor, so copies of a module (``copy.deepcopy``, pickling,
    ``nn.DataParallel``'s replicas) share it and still run their own children. ``source``
    is the Python it runs."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self._compile()

    def _compile(self) -> None:
        python = self.graph.python_code(root_module="self")
        # (named by its text and kept in linecache, as torch.fx does: tracebacks show the
        # line, and checks.py reads what a trace through it recorded)
        name = f"<fuse_stages forward {hashlib.sha1(python.src.encode()).hexdigest()[:12]}>"
        linecache.cache[name] = (len(python.src), None, python.src.splitlines(True), name)
        scope = dict(python.globals)
        exec(compile(python.src, name, "exec"), scope)  # noqa: S102
        self.source, self._function = python.src, scope["forward"]

    def __call__(self, module: nn.Module, *args, **kwargs):
        return self._function(module, *args, **kwargs)

    def __getstate__(self):
        return {"graph": self.graph}  # (the compiled function does not pickle: compiled again)

    def __setstate__(self, state):
        self.graph = state["graph"]
        self._compile()


class FusedBlock(nn.Module):
    """A module with residual tails, fused: a new object that takes the block's place in its
    parent, of a subclass of the block's own class (``fused_class(BasicBlock)``, printed
    ``BasicBlockFused``) whose only change is ``forward``: it runs ``fused_code``
    (:class:`FusedCode`: ``print(block.fused_code.source)`` shows it), which calls the
    block's own children. It holds what the block held, the same objects under the same
    names (children, parameters, buffers, hooks, attributes), so state-dict keys, parameter
    names and an optimizer built before fusing stay valid, and everything the class gives
    still answers: ``isinstance(block, BasicBlock)``, its methods (``super()`` included),
    class attributes (``block.expansion``), properties, its state-dict ``_version`` and
    loading hooks. ``block_class`` is the block's class. What it costs: the class's
    ``forward`` is not what runs (a subclass overriding it again, or code calling
    ``BasicBlock.forward(block, x)``, gets the unfused computation, which stays correct: the
    conv called with one input computes ``bn(conv(x))``)."""

    @classmethod
    def of(cls, block: nn.Module, code: FusedCode) -> "FusedBlock":
        """The fused block that runs ``code`` with ``block``'s state (``block`` is not changed:
        the caller registers the result in its place)."""
        fused = rebuilt_as(block, fused_class(type(block)))
        fused.fused_code = code
        return fused

    @property
    def block_class(self) -> type:
        return type(self).__mro__[2]  # (the generated class, FusedBlock, the block's class)

    def forward(self, *args, **kwargs):
        return self.fused_code(self, *args, **kwargs)

    def __reduce_ex__(self, protocol):
        # The generated class is not importable by name: pickles and copies rebuild it
        # from the block's class (which is, as for the unfused model).
        return _rebuild, (self.block_class, self.__getstate__())


_FUSED_CLASSES = {}


def fused_class(block_class: type) -> type:
    """``block_class``'s fused subclass (one per class): FusedBlock's forward, the rest the
    block's class."""
    cls = _FUSED_CLASSES.get(block_class)
    if cls is None:
        cls = type(block_class.__name__ + "Fused", (FusedBlock, block_class),
                   {"__module__": __name__, "__doc__": FusedBlock.__doc__})
        _FUSED_CLASSES[block_class] = cls
    return cls


def _rebuild(block_class: type, state: dict) -> FusedBlock:
    fused = fused_class(block_class).__new__(fused_class(block_class))
    fused.__setstate__(state)
    return fused
