"""The registration every fused attention op shares, written once.

Every attention variant's compiled op has one calling convention::

    <name>_forward(a, b, c, rowptr, col, eid, colptr, csc_row, csc_perm, edge, scalar, dropout, seed)
        -> (out [N_dst, H, C], lse [N_dst, H])
    <name>_backward(grad_out, a, b, c, rowptr, col, eid, colptr, csc_row, csc_perm, edge, out, lse,
                    scalar, dropout, seed) -> (grad_a, grad_b, grad_c, grad_edge)

(three node tensors, the CSR by destination with its transposed CSC, optional per-edge
features in the caller's edge order, one float parameter, counter-based dropout). A
variant is then a spec: its name, the shape of ``out``, and its differentiable reference;
:func:`register` derives the fake kernels, the autograd formula (C++ backward; a
``create_graph=True`` backward recomputes through the reference, so double backward is
exact) and the eager fast path from it.
"""
from typing import Callable, NamedTuple

import torch

from .._util import acc_dtype
from .graph_attention import (_EAGER, caller_order_edges, create_graph, differentiable_grads,
                              eager_autograd)


class AttentionSpec(NamedTuple):
    """name: the op family (``neptune::<name>_forward``/``_backward``); out_shape(a, b, c):
    the output's shape; num_src(a, b, c): the number of source nodes; reference(a, b, c, edge, src, dst, num_rows, scalar, dropout, seed):
    the differentiable pure-PyTorch output [num_rows, H, C]; public: the Python function
    users call (named in errors)."""
    name: str
    out_shape: Callable
    num_src: Callable
    reference: Callable
    public: str


def register(spec: AttentionSpec) -> None:
    """Fake kernels, autograd and the eager Function for ``spec``'s compiled op."""
    fwd_name = f"neptune::{spec.name}_forward"

    @torch.library.register_fake(fwd_name)
    def _fwd_fake(a, b, c, rowptr, col, eid, colptr, csc_row, csc_perm, edge, scalar, dropout, seed):
        shape = spec.out_shape(a, b, c)
        return a.new_empty(shape), a.new_empty(shape[:2], dtype=acc_dtype(a.dtype))

    @torch.library.register_fake(f"neptune::{spec.name}_backward")
    def _bwd_fake(grad_out, a, b, c, rowptr, col, eid, colptr, csc_row, csc_perm, edge, out, lse,
                  scalar, dropout, seed):
        ge = torch.empty_like(edge) if edge is not None else a.new_empty((0,))
        return torch.empty_like(a), torch.empty_like(b), torch.empty_like(c), ge

    def setup_context(ctx, inputs, output):
        (a, b, c, rowptr, col, eid, colptr, csc_row, csc_perm, edge, scalar, dropout, seed) = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.has_edge = edge is not None
        ctx.scalar, ctx.dropout = scalar, dropout
        ctx.save_for_backward(a, b, c, rowptr, col, eid, colptr, csc_row, csc_perm, edge, out, lse, seed)

    def backward(ctx, grad_out, grad_lse):
        (a, b, c, rowptr, col, eid, colptr, csc_row, csc_perm, edge, out, lse, seed) = ctx.saved_tensors
        if create_graph():  # a double backward: differentiable gradients from the reference
            src, dst = caller_order_edges(rowptr, col, eid)
            rows = rowptr.shape[0] - 1
            s = None if seed is None else int(seed)
            return differentiable_grads(
                lambda a_, b_, c_, e_: spec.reference(a_, b_, c_, e_, src, dst, rows, ctx.scalar,
                                                      ctx.dropout, s),
                (a, b, c, edge), (0, 1, 2, 9), grad_out, 13)
        if colptr.numel() != spec.num_src(a, b, c) + 1:
            raise RuntimeError(f"{fwd_name} was called without the transposed graph, so it cannot "
                               f"be differentiated; call it through {spec.public}")
        ga, gb, gc, ge = getattr(torch.ops.neptune, f"{spec.name}_backward")(
            grad_out.contiguous(), a, b, c, rowptr, col, eid, colptr, csc_row, csc_perm, edge, out,
            lse, ctx.scalar, ctx.dropout, seed)
        return (ga, gb, gc, None, None, None, None, None, None, ge if ctx.has_edge else None,
                None, None, None)

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)
    _EAGER[f"{spec.name}_forward"] = eager_autograd(
        getattr(torch.ops.neptune, f"{spec.name}_forward"), setup_context, backward)

