"""What every fused attention op (GAT, GATv2, graph transformer) shares, written once:
dropout seeds, the transposed graph, double backward, the input checks, and the
registration derived from a spec.

Every attention variant's compiled op has one calling convention::

    <name>_forward(a, b, c, rowptr, col, eid, colptr, csc_row, csc_perm, edge, scalar, dropout, seed)
        -> (out [N_dst, H, C], lse [N_dst, H])
    <name>_backward(grad_out, a, b, c, rowptr, col, eid, colptr, csc_row, csc_perm, edge, out, lse,
                    scalar, dropout, seed) -> (grad_a, grad_b, grad_c, grad_edge)

(three node tensors, the CSR by destination with its transposed CSC, optional per-edge
features in the caller's edge order, one float parameter, counter-based dropout). A
variant is then a spec: its name, the shape of ``out``, and its differentiable reference;
:func:`register` derives the fake kernels and the differentiable gradients a
``create_graph=True`` backward recomputes through the reference (so double backward is
exact). The autograd is one C++ function for every variant
(csrc/attention/common/autograd.cpp): no Python runs in a training step's backward.
"""
from typing import Callable, NamedTuple, Optional

import torch

from .. import _ext, backend as _backend
from .._util import acc_dtype, check as _check, functorch_active, is_compiling as _is_compiling, promote
from ..graph import Graph


# ----------------------------------------------------------------------------
# The checks every attention op's inputs pass (each op adds its own shape rules between them).

def check_tensors(graph, tensors) -> None:
    """ValueError unless ``graph`` is a Graph and every (name, tensor) a floating-point tensor."""
    _check(isinstance(graph, Graph), lambda: f"graph must be a neptune_ext.Graph, got {type(graph).__name__} "
           "(build one with Graph.from_edge_index(edge_index))")
    for name, t in tensors:
        _check(isinstance(t, torch.Tensor), lambda: f"{name} must be a torch.Tensor, got {type(t).__name__}")
        _check(t.is_floating_point(), lambda: f"{name} must be a floating-point tensor, got {t.dtype}")


def check_placement(graph, lead, others, edge, edge_shape, dropout) -> None:
    """Every tensor on the device of ``lead`` = (name, tensor), the graph too; ``edge`` =
    (name, tensor or None) of shape ``edge_shape`` (E first); dropout in [0, 1)."""
    lead_name, x = lead
    for name, t in others:
        _check(t.device == x.device, lambda: f"{name} is on {t.device} but {lead_name} is on {x.device}")
    _check(graph.device == x.device,
           lambda: f"graph is on {graph.device} but {lead_name} is on {x.device} (use graph.to({str(x.device)!r}))")
    name, t = edge
    if t is not None:
        dims = ", ".join(["E"] + ["H", "C"][:len(edge_shape) - 1])
        _check(isinstance(t, torch.Tensor) and t.is_floating_point(),
               lambda: f"{name} must be a floating-point tensor of shape [{dims}]")
        _check(tuple(t.shape) == tuple(edge_shape),
               lambda: f"{name} must have shape [{dims}] = {list(edge_shape)}, got {list(t.shape)}")
        _check(t.device == x.device, lambda: f"{name} is on {t.device} but {lead_name} is on {x.device}")
    _check(isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0,
           lambda: f"dropout must be a float in [0, 1), got {dropout!r}")


# ----------------------------------------------------------------------------
# Dropout seeds and the transposed graph.

def _new_seed() -> torch.Tensor:
    # Drawn from torch's default CPU generator, so torch.manual_seed reproduces it.
    return torch.randint(0, 2**62, (), dtype=torch.int64)


def dropout_and_seed(dropout, training: bool, seed, device=None):
    """(p, seed) for an attention op: p = dropout when training, else 0; with p > 0 a seed
    (drawn when none is given, checked otherwise); without dropout no seed.

    A seed drawn while a CUDA graph is being captured (``device`` on CUDA) would be baked
    into the graph, and every replay would drop the same edges: that is refused with a
    ValueError (pass ``seed``, a fresh CPU tensor filled before each replay, or capture in
    eval mode)."""
    p = float(dropout) if training else 0.0
    if p == 0.0:
        return 0.0, None
    if seed is None:
        if (device is not None and torch.device(device).type == "cuda" and not _is_compiling()
                and torch.cuda.is_current_stream_capturing()):
            raise ValueError(
                "dropout: attention dropout inside CUDA graph capture would replay one dropout "
                "mask on every replay; capture with dropout=0 (or the layer in eval mode), or call "
                "the op with a seed tensor you refill before each replay")
        seed = _new_seed()
    _check(isinstance(seed, torch.Tensor) and seed.numel() == 1 and seed.dtype == torch.int64
           and seed.device.type == "cpu", "seed must be a CPU int64 tensor with one element")
    return p, seed


def enter(validate: Callable, a, b, c, graph: Graph, scalar, edge, dropout, training: bool, seed):
    """The entry every attention op shares: ``validate(a, b, c, graph, scalar, edge, dropout)``
    (skipped inside compiled code: the checks read tensor values), the four tensors promoted
    to one floating dtype, and :func:`dropout_and_seed`. Returns (a, b, c, edge, p, seed)."""
    if not _is_compiling():
        validate(a, b, c, graph, scalar, edge, dropout)
    a, b, c, edge = promote(a, b, c, edge)
    p, seed = dropout_and_seed(dropout, training, seed, a.device)
    return a, b, c, edge, p, seed


def kernel_csc(graph: Graph, *inputs) -> tuple:
    """The transposed graph when backward will need it (grad mode on and an input that
    requires grad), else three empty tensors: inference never builds the CSC."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return graph.csc()
    empty = graph.col.new_empty(0)
    return empty, empty, empty


# ----------------------------------------------------------------------------
# Double backward: a backward run with create_graph=True must itself be differentiable.
# The kernels' backward is not, so those calls recompute the gradients through the
# pure-PyTorch reference (exact, E x H x C memory): never a silently wrong number.

def caller_order_edges(rowptr: torch.Tensor, col: torch.Tensor, eid: torch.Tensor):
    """(src, dst) int64 [E] in the caller's edge order from a CSR by destination and its
    edge ids (the order the reference and the dropout hash use)."""
    E = col.shape[0]
    dst_csr = torch.repeat_interleave(torch.arange(rowptr.shape[0] - 1, device=col.device),
                                      rowptr.long().diff(), output_size=E)
    eid = eid.long()
    src = torch.empty(E, dtype=torch.int64, device=col.device).index_put_((eid,), col.long())
    dst = torch.empty(E, dtype=torch.int64, device=col.device).index_put_((eid,), dst_csr)
    return src, dst


def differentiable_grads(reference, inputs, positions, grad_out, num_outputs: int) -> tuple:
    """Gradients of ``reference(*inputs)`` for ``grad_out`` that are themselves
    differentiable (create_graph=True), laid out as the op's backward returns them: the
    gradient of inputs[k] at index positions[k] of a tuple of num_outputs, None elsewhere.
    Any input may be None (no gradient)."""
    wanted = [t is not None and t.requires_grad for t in inputs]
    with torch.enable_grad():
        # One view per input: an input passed twice (score_src is score_dst) then gets the
        # gradient of its own argument position, not their sum twice.
        inputs = [t.view_as(t) if w else t for t, w in zip(inputs, wanted)]
        out = reference(*inputs)
        out = out[:grad_out.shape[0]]
        diff = [t for t, w in zip(inputs, wanted) if w]
        grads = iter(torch.autograd.grad(out, diff, grad_out, create_graph=True, allow_unused=True)
                     if diff else ())
    result = [None] * num_outputs
    for t, w, pos in zip(inputs, wanted, positions):
        if w:
            g = next(grads)
            result[pos] = g if g is not None else torch.zeros_like(t)
    return tuple(result)


def _forward_ad_active() -> bool:
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def kernel_allowed() -> bool:
    """False inside a torch.func transform (vmap, grad, vjp, jacrev, ...) and inside a
    forward-mode AD level (torch.autograd.forward_ad.dual_level): the compiled ops have no
    batching rule and their autograd is C++, which functorch does not run and which has no
    forward-mode formula, so there the attention ops compute through their pure-PyTorch
    references (exact, E x H x C memory), which every transform handles."""
    return _is_compiling() or not (functorch_active() or _forward_ad_active())


# The warp-per-row CUDA kernels (GATv2, graph transformer) hold a row's H * C features in one
# warp's registers; wider shapes run the reference on CUDA.
WARP_ROW_MAX_HC = 1024


def runs_kernel(op: str, device_type: str, H: int = 0, C: int = 0, warp_row: bool = False) -> bool:
    """Whether ``neptune::<op>``'s compiled kernel runs here: the backend's rule
    (:func:`neptune_ext.backend.runs_kernel`), the warp-per-row kernels' width limit on CUDA,
    and :func:`kernel_allowed` (not inside torch.func transforms or forward-mode AD)."""
    if warp_row and device_type == "cuda" and not 0 < H * C <= WARP_ROW_MAX_HC:
        return False
    return _backend.runs_kernel(op, device_type) and kernel_allowed()


# ----------------------------------------------------------------------------
# The spec.

class AttentionSpec(NamedTuple):
    """name: the op family (``neptune::<name>_forward``/``_backward``); out_shape(a, b, c):
    the output's shape; reference(a, b, c, edge, src, dst, num_rows, scalar, dropout, seed):
    the differentiable pure-PyTorch output [num_rows, H, C] (or its first rows); lse_rows(rowptr):
    the log-sum-exp's rows when they are not out's; heads(a, b, c): H when out is not
    [rows, H, C] (GATv2's out takes x_r's form, [rows, H * C] included). Which input holds the sources and the
    function named in errors are the C++ autograd's (attention/common/autograd.cpp: the variant table)."""
    name: str
    out_shape: Callable
    reference: Callable
    lse_rows: Optional[Callable] = None
    heads: Optional[Callable] = None


_SPECS = {}


def register(spec: AttentionSpec) -> None:
    """Fake kernels for ``spec``'s compiled ops, and its differentiable gradients for a
    backward with ``create_graph=True``. The autograd itself is C++
    (csrc/attention/common/autograd.cpp): a training step runs no Python in backward."""
    @torch.library.register_fake(f"neptune::{spec.name}_forward")
    def _fwd_fake(a, b, c, rowptr, col, eid, colptr, csc_row, csc_perm, edge, scalar, dropout, seed):
        shape = spec.out_shape(a, b, c)
        rows = shape[0] if spec.lse_rows is None else spec.lse_rows(rowptr)
        heads = shape[1] if spec.heads is None else spec.heads(a, b, c)
        return a.new_empty(shape), a.new_empty((rows, heads), dtype=acc_dtype(a.dtype))

    @torch.library.register_fake(f"neptune::{spec.name}_backward")
    def _bwd_fake(grad_out, a, b, c, rowptr, col, eid, colptr, csc_row, csc_perm, edge, out, lse,
                  scalar, dropout, seed):
        ge = torch.empty_like(edge) if edge is not None else a.new_empty((0,))
        return torch.empty_like(a), torch.empty_like(b), torch.empty_like(c), ge

    _SPECS[spec.name] = spec


def _grads_reference(variant, grad_out, a, b, c, rowptr, col, eid, edge, scalar, dropout, seed):
    """neptune::attention_grads_reference: [grad_a, grad_b, grad_c, grad_edge] of the
    variant's reference, differentiable (the C++ autograd calls it inside a backward with
    create_graph=True); zeros for an input that wants no gradient."""
    spec = _SPECS[variant]
    src, dst = caller_order_edges(rowptr, col, eid)
    rows = rowptr.shape[0] - 1
    s = None if seed is None else int(seed)
    grads = differentiable_grads(
        lambda a_, b_, c_, e_: spec.reference(a_, b_, c_, e_, src, dst, rows, scalar, dropout, s),
        (a, b, c, edge), (0, 1, 2, 3), grad_out, 4)
    like = (a, b, c, edge if edge is not None else a.new_zeros(0))
    return [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, like)]


if _ext._C is not None:  # (the op's schema is the extension's)
    _LIB = torch.library.Library("neptune", "IMPL")
    _LIB.impl("attention_grads_reference", _grads_reference, "CompositeImplicitAutograd")
