"""What a module whose forward holds residual tails runs after ``fuse_stages``: its traced
graph with each ``act(bn(conv(x)) + identity)`` replaced by ``conv(x, identity)``
(:class:`FusedCode`), in a module that takes the block's place in its parent
(:class:`FusedBlock`); the model's root keeps its class and runs the code from its
``forward`` (``fuse_layout.CallerLayout``)."""
import hashlib
import linecache

from torch import fx, nn

from .stage_passthrough import rebuilt_as

__all__ = ["FusedCode", "FusedBlock"]


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
        # line, and fuse_checks reads what a trace through it recorded)
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
    """A module with residual tails, fused: it takes the block's place in its parent and
    holds what the block held, the same objects under the same names (children, parameters,
    buffers, hooks, attributes: ``block.stride`` still reads), so state-dict keys, parameter
    names and an optimizer built before fusing stay valid. Its forward is ``fused_code``
    (:class:`FusedCode`: ``print(block.fused_code.source)`` shows it), which calls the
    block's own children; ``block_class`` is the class it was (``print`` names it
    ``<class>Fused``). What that costs: ``isinstance(block, BasicBlock)`` is False, and the
    class's methods other than ``forward`` (and its properties) are not there."""

    @classmethod
    def of(cls, block: nn.Module, code: FusedCode) -> "FusedBlock":
        """The FusedBlock that runs ``code`` with ``block``'s state (``block`` is not changed:
        the caller registers the result in its place)."""
        fused = rebuilt_as(block, cls)
        fused.block_class = type(block)
        fused.fused_code = code
        return fused

    def forward(self, *args, **kwargs):
        return self.fused_code(self, *args, **kwargs)

    def _get_name(self) -> str:
        return self.block_class.__name__ + "Fused"
