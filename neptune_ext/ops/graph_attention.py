"""Sparse graph attention: validation, autograd, fake kernels, dispatch.

    s_ij  = LeakyReLU(score_src[j] + score_dst[i] (+ edge_logits[e(i,j)]))
    a_ij  = softmax over j in N(i) of s_ij          (per head)
    out_i = sum_j a_ij * h[j]                        (no in-edges: 0)

The compiled kernels (torch.ops.neptune.gat_forward / gat_backward) are fused:
no per-edge feature tensor in forward, deterministic backward without atomics.
Without the extension, the pure-PyTorch reference (neptune_ext.reference) runs.
"""
import math
from typing import Optional, Tuple, Union

import torch

from .. import _backend, _ext
from .._util import acc_dtype, check as _check, is_compiling as _is_compiling, promote
from ..graph import Graph
from ..reference import attention_weights_reference, sparse_graph_attention_reference

__all__ = ["sparse_graph_attention", "attention_weights", "check_slope"]


def check_slope(negative_slope) -> None:
    """ValueError unless ``negative_slope`` is a finite real number."""
    _check(isinstance(negative_slope, (int, float)) and not isinstance(negative_slope, bool)
           and math.isfinite(negative_slope),
           f"negative_slope must be a finite float, got {negative_slope!r}")


def _validate(h, score_src, score_dst, graph, negative_slope, edge_logits, dropout):
    _check(isinstance(graph, Graph), f"graph must be a neptune_ext.Graph, got {type(graph).__name__} "
           "(build one with Graph.from_edge_index(edge_index))")
    for name, t in (("h", h), ("score_src", score_src), ("score_dst", score_dst)):
        _check(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
        _check(t.is_floating_point(), f"{name} must be a floating-point tensor, got {t.dtype}")
    _check(h.dim() == 3, f"h must have shape [N_src, H, C], got {list(h.shape)}")
    n_src, H, _ = h.shape
    _check(score_src.shape == (n_src, H),
           f"score_src must have shape [N_src, H] = [{n_src}, {H}], got {list(score_src.shape)}")
    _check(score_dst.dim() == 2 and score_dst.shape[1] == H,
           f"score_dst must have shape [N_dst, H] with H = {H}, got {list(score_dst.shape)}")
    _check(n_src == graph.num_src,
           f"h has {n_src} source nodes but the graph has num_src = {graph.num_src}")
    _check(score_dst.shape[0] == graph.num_dst,
           f"score_dst has {score_dst.shape[0]} destination nodes but the graph has num_dst = {graph.num_dst}")
    for name, t in (("score_src", score_src), ("score_dst", score_dst)):
        _check(t.device == h.device, f"{name} is on {t.device} but h is on {h.device}")
    _check(graph.device == h.device,
           f"graph is on {graph.device} but h is on {h.device} (use graph.to({str(h.device)!r}))")
    if edge_logits is not None:
        _check(isinstance(edge_logits, torch.Tensor) and edge_logits.is_floating_point(),
               "edge_logits must be a floating-point tensor of shape [E, H]")
        _check(edge_logits.shape == (graph.num_edges, H),
               f"edge_logits must have shape [E, H] = [{graph.num_edges}, {H}], got {list(edge_logits.shape)}")
        _check(edge_logits.device == h.device, f"edge_logits is on {edge_logits.device} but h is on {h.device}")
    check_slope(negative_slope)
    _check(isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0,
           f"dropout must be a float in [0, 1), got {dropout!r}")


def _new_seed() -> torch.Tensor:
    # Drawn from torch's default CPU generator, so torch.manual_seed reproduces it.
    return torch.randint(0, 2**62, (), dtype=torch.int64)


def dropout_and_seed(dropout, training: bool, seed):
    """(p, seed) for an attention op: p = dropout when training, else 0; with p > 0 a seed
    (drawn when none is given, checked otherwise); without dropout no seed."""
    p = float(dropout) if training else 0.0
    if p == 0.0:
        return 0.0, None
    if seed is None:
        seed = _new_seed()
    _check(isinstance(seed, torch.Tensor) and seed.numel() == 1 and seed.dtype == torch.int64
           and seed.device.type == "cpu", "seed must be a CPU int64 tensor with one element")
    return p, seed


def kernel_csc(graph: Graph, *inputs) -> tuple:
    """The transposed graph when backward will need it (grad mode on and an input that
    requires grad), else three empty tensors: inference never builds the CSC."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return graph.csc()
    empty = graph.col.new_empty(0)
    return empty, empty, empty


def sparse_graph_attention(h: torch.Tensor, score_src: torch.Tensor, score_dst: torch.Tensor,
                           graph: Graph, negative_slope: float = 0.2,
                           edge_logits: Optional[torch.Tensor] = None, dropout: float = 0.0,
                           training: bool = False, return_attention: bool = False,
                           seed: Optional[torch.Tensor] = None
                           ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Fused GAT attention + aggregation.

    Args:
        h: [N_src, H, C] projected source features.
        score_src: [N_src, H] source half of the attention logit (<a_src, h_j>).
        score_dst: [N_dst, H] destination half of the attention logit.
        graph: a :class:`neptune_ext.Graph` with ``num_src = N_src``, ``num_dst = N_dst``.
        negative_slope: LeakyReLU slope applied to the logits.
        edge_logits: optional [E, H] additive logits, in the caller's edge order.
        dropout: attention dropout probability, applied when ``training``.
        return_attention: also return the attention weights [E, H] (after dropout),
            in the caller's edge order.
        seed: optional CPU int64 scalar tensor fixing the dropout mask.

    Returns:
        out [N_dst, H, C], or (out, alpha) with ``return_attention=True``. Inputs of
        different floating dtypes are computed in their promoted dtype (as torch's binary
        ops do: a bfloat16 ``h`` with float32 scores runs, and returns, float32).

    Differentiable twice: a backward with ``create_graph=True`` recomputes the gradients
    with the differentiable reference (its memory: E x H x C), so gradient penalties and
    second-order methods get exact second derivatives.

    Example::

        >>> g = Graph.from_edge_index(torch.tensor([[0, 1, 2], [1, 2, 1]]))
        >>> h = torch.randn(3, 2, 8); s = torch.randn(3, 2)
        >>> sparse_graph_attention(h, s, s, g).shape
        torch.Size([3, 2, 8])
    """
    if not _is_compiling():
        _validate(h, score_src, score_dst, graph, negative_slope, edge_logits, dropout)
    h, score_src, score_dst, edge_logits = promote(h, score_src, score_dst, edge_logits)
    p, seed = dropout_and_seed(dropout, training, seed)

    if _backend.runs_kernel("gat_forward", h.device.type):
        colptr, csc_row, csc_perm = kernel_csc(graph, h, score_src, score_dst, edge_logits)
        out, lse = forward_op("gat_forward", colptr)(
            h.contiguous(), score_src.contiguous(), score_dst.contiguous(), graph.rowptr,
            graph.col, graph.eid, colptr, csc_row, csc_perm,
            None if edge_logits is None else edge_logits.contiguous(),
            float(negative_slope), p, seed if p > 0.0 else None)
        if not return_attention:
            return out
        alpha = attention_weights(score_src, score_dst, graph, negative_slope, edge_logits, p, seed)
        return out, alpha

    src, dst = graph.edge_index[0], graph.edge_index[1]
    return sparse_graph_attention_reference(
        h, score_src, score_dst, src, dst, graph.num_dst, float(negative_slope), edge_logits, p,
        None if seed is None else int(seed), return_attention)


def attention_weights(score_src, score_dst, graph: Graph, negative_slope: float = 0.2,
                      edge_logits=None, dropout: float = 0.0, seed=None) -> torch.Tensor:
    """Attention weights [E, H] in the caller's edge order (differentiable).

    Materializes E x H values: call it when the weights are wanted, not in the hot path.
    """
    src, dst = graph.edge_index[0], graph.edge_index[1]
    return attention_weights_reference(score_src, score_dst, src, dst, graph.num_dst,
                                       float(negative_slope), edge_logits, dropout,
                                       None if seed is None else int(seed))


# ----------------------------------------------------------------------------
# Double backward: a backward run with create_graph=True must itself be differentiable.
# The kernels' backward is not, so those calls recompute the gradients through the
# pure-PyTorch reference (exact, E x H x C memory): never a silently wrong number.

def create_graph() -> bool:
    """True inside a backward that builds a graph (``create_graph=True``)."""
    return torch.is_grad_enabled() and not _is_compiling()


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


# ----------------------------------------------------------------------------
# Eager autograd. torch.library.register_autograd (below) serves torch.compile, export and
# direct torch.ops calls; in eager mode its generic wrapper costs per call (argument
# filling, schema walks) - as much as the kernels on a small graph. Eager calls that need
# gradients take an autograd.Function with the very same setup_context and backward.

_EAGER = {}


def eager_autograd(op, setup_context, backward):
    """Two autograd.Functions running ``op`` with the registration's own context and backward:
    (fast, functorch). ``fast`` takes ctx in forward (the cheapest apply); ``functorch`` has a
    separate setup_context, as torch.func transforms (grad, jacrev, vmap) require: ~20 µs
    more a call, so it runs only while such a transform is active."""
    class Fast(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            output = op(*args)
            setup_context(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    class Functorch(torch.autograd.Function):
        @staticmethod
        def forward(*args):
            return op(*args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            setup_context(ctx, inputs, output)

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    for cls, kind in ((Fast, "autograd"), (Functorch, "functorch")):
        cls.__name__ = cls.__qualname__ = f"{op.__name__}_{kind}"
    return Fast, Functorch


def _functorch_active() -> bool:
    try:
        return torch._C._are_functorch_transforms_active()
    except AttributeError:
        return False


def forward_op(name: str, colptr: torch.Tensor):
    """How to call torch.ops.neptune.<name>: through an eager Function when backward will
    run (``colptr`` is the transposed graph then) outside torch.compile, else the op."""
    fns = _EAGER.get(name)
    if fns is not None and colptr.numel() > 0 and not _is_compiling():
        return fns[1].apply if _functorch_active() else fns[0].apply
    return getattr(torch.ops.neptune, name)


# ----------------------------------------------------------------------------
# torch.library registrations (fake kernels + autograd) for the compiled ops.

def _register():
    lib = "neptune::gat_forward"

    @torch.library.register_fake(lib)
    def _gat_forward_fake(h, score_src, score_dst, rowptr, col, eid, colptr, csc_row, csc_perm,
                          edge_logits, negative_slope, dropout, seed):
        n_dst = score_dst.shape[0]
        acc = acc_dtype(h.dtype)
        return h.new_empty((n_dst, h.shape[1], h.shape[2])), h.new_empty((n_dst, h.shape[1]), dtype=acc)

    @torch.library.register_fake("neptune::gat_backward")
    def _gat_backward_fake(grad_out, h, score_src, score_dst, rowptr, col, eid, colptr, csc_row,
                           csc_perm, edge_logits, out, lse, negative_slope, dropout, seed):
        gel = torch.empty_like(edge_logits) if edge_logits is not None else h.new_empty((0,))
        return torch.empty_like(h), torch.empty_like(score_src), torch.empty_like(score_dst), gel

    def setup_context(ctx, inputs, output):
        (h, score_src, score_dst, rowptr, col, eid, colptr, csc_row, csc_perm, edge_logits,
         negative_slope, dropout, seed) = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.has_edge_logits = edge_logits is not None
        ctx.negative_slope, ctx.dropout = negative_slope, dropout
        ctx.save_for_backward(h, score_src, score_dst, rowptr, col, eid, colptr, csc_row, csc_perm,
                              edge_logits, out, lse, seed)

    def backward(ctx, grad_out, grad_lse):
        (h, score_src, score_dst, rowptr, col, eid, colptr, csc_row, csc_perm, edge_logits, out,
         lse, seed) = ctx.saved_tensors
        if create_graph():  # a double backward: differentiable gradients from the reference
            src, dst = caller_order_edges(rowptr, col, eid)
            return differentiable_grads(
                lambda h_, ss_, sd_, el_: sparse_graph_attention_reference(
                    h_, ss_, sd_, src, dst, score_dst.shape[0], ctx.negative_slope, el_,
                    ctx.dropout, None if seed is None else int(seed)),
                (h, score_src, score_dst, edge_logits), (0, 1, 2, 9), grad_out, 13)
        if colptr.numel() != h.shape[0] + 1:
            raise RuntimeError("neptune::gat_forward was called without the transposed graph, "
                               "so it cannot be differentiated; call it through "
                               "neptune_ext.ops.sparse_graph_attention")
        gh, gss, gsd, gel = torch.ops.neptune.gat_backward(
            grad_out.contiguous(), h, score_src, score_dst, rowptr, col, eid, colptr, csc_row,
            csc_perm, edge_logits, out, lse, ctx.negative_slope, ctx.dropout, seed)
        return (gh, gss, gsd, None, None, None, None, None, None,
                gel if ctx.has_edge_logits else None, None, None, None)

    torch.library.register_autograd(lib, backward, setup_context=setup_context)
    _EAGER["gat_forward"] = eager_autograd(torch.ops.neptune.gat_forward, setup_context, backward)


if _ext._C is not None:
    _register()
