"""GATv2 attention (dynamic attention): validation, autograd, fake kernels, dispatch.

    z_ij  = x_l[j] + x_r[i] (+ edge_feat[e(i,j)])        [H, C]
    s_ij  = sum_c att[h, c] * LeakyReLU(z_ij[h, c])      (per head h)
    a_ij  = softmax over j in N(i) of s_ij
    out_i = sum_j a_ij * x_l[j]                           (no in-edges: 0)

The compiled kernels (torch.ops.neptune.gatv2_forward / gatv2_backward) are fused like
the GAT v1 op: one pass per destination with an online softmax, nothing of size
E x H x C allocated in forward, a deterministic backward without atomics (grad att is
a fixed-order reduction). Without them the pure-PyTorch reference runs.
"""
from typing import Optional, Tuple, Union

import torch

from .. import _ext
from .._util import check as _check
from ..graph import Graph
from .reference import gatv2_attention_reference, gatv2_attention_weights_reference
from . import spec as attention_spec
from .spec import kernel_csc
from .gat import check_slope

__all__ = ["gatv2_attention", "gatv2_attention_weights"]


def _heads(x_l, att):
    """(H, C): from x_l when it is [N, H, C], else from att (x_l is [N, H * C])."""
    if x_l.dim() == 3:
        return x_l.shape[1], x_l.shape[2]
    return att.shape[-2], att.shape[-1]


def _validate(x_l, x_r, att, graph, negative_slope, edge_feat, dropout):
    attention_spec.check_tensors(graph, (("x_l", x_l), ("x_r", x_r), ("att", att)))
    _check(x_l.dim() in (2, 3),
           lambda: f"x_l must have shape [N_src, H, C] (or [N_src, H * C]), got {list(x_l.shape)}")
    _check(att.dim() in (2, 3) and (att.dim() == 2 or att.shape[0] == 1),
           lambda: f"att must have shape [H, C] or [1, H, C], got {list(att.shape)}")
    n_src = x_l.shape[0]
    H, C = _heads(x_l, att)
    _check(tuple(x_l.shape[1:]) in ((H, C), (H * C,)),
           lambda: f"x_l must have shape [N_src, H * C] with H, C = {H}, {C} (the shape of att), "
                   f"got {list(x_l.shape)}")
    _check(x_r.dim() == x_l.dim() and tuple(x_r.shape[1:]) == tuple(x_l.shape[1:]),
           lambda: f"x_r must have shape [N_dst, {', '.join(map(str, x_l.shape[1:]))}] like x_l "
                   f"(H, C = {H}, {C}), got {list(x_r.shape)}")
    _check(att.numel() == H * C and att.dim() in (2, 3) and tuple(att.shape[-2:]) == (H, C),
           lambda: f"att must have shape [H, C] or [1, H, C] with H, C = {H}, {C}, got {list(att.shape)}")
    _check(n_src == graph.num_src, lambda: f"x_l has {n_src} source nodes but the graph has num_src = {graph.num_src}")
    _check(x_r.shape[0] <= graph.num_dst,
           lambda: f"x_r has {x_r.shape[0]} destination nodes but the graph has num_dst = {graph.num_dst}")
    attention_spec.check_placement(graph, ("x_l", x_l), (("x_r", x_r), ("att", att)),
                                   ("edge_feat", edge_feat), (graph.num_edges, H, C), dropout)
    check_slope(negative_slope)


def gatv2_attention(x_l: torch.Tensor, x_r: torch.Tensor, att: torch.Tensor, graph: Graph,
                    negative_slope: float = 0.2, edge_feat: Optional[torch.Tensor] = None,
                    dropout: float = 0.0, training: bool = False, return_attention: bool = False,
                    seed: Optional[torch.Tensor] = None
                    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Fused GATv2 attention + aggregation.

    Args:
        x_l: [N_src, H, C] source features (gathered per edge, summed into the output), or
            [N_src, H * C] as a Linear layer returns them (H and C from ``att``'s shape).
        x_r: [N_dst, H, C] destination features (the form of ``x_l``). The graph may have
            more destination rows than ``x_r``: edges into those rows are ignored (zero
            weight, no output).
        att: [H, C] (or [1, H, C]) attention vector per head.
        graph: a :class:`neptune_ext.Graph` with ``num_src = N_src``, ``num_dst >= N_dst``.
        negative_slope: LeakyReLU slope.
        edge_feat: optional [E, H, C] edge features added to ``z``, caller's edge order.
        dropout: attention dropout probability, applied when ``training``.
        return_attention: also return the attention weights [E, H] (after dropout).
        seed: optional CPU int64 scalar tensor fixing the dropout mask.

    Returns:
        out [N_dst, H, C] (the shape of ``x_r``), or (out, alpha) with ``return_attention=True``. Inputs of
        different floating dtypes are computed in their promoted dtype (a bfloat16
        ``x_l``/``x_r`` with a float32 ``att`` runs, and returns, float32), as in PyG.

    Differentiable twice (a ``create_graph=True`` backward recomputes the gradients with
    the differentiable reference).

    Example::

        >>> g = Graph.from_edge_index(torch.tensor([[0, 1, 2], [1, 2, 1]]))
        >>> x = torch.randn(3, 2, 8)
        >>> gatv2_attention(x, x, torch.randn(2, 8), g).shape
        torch.Size([3, 2, 8])
    """
    x_l, x_r, att, edge_feat, p, seed = attention_spec.enter(
        _validate, x_l, x_r, att, graph, negative_slope, edge_feat, dropout, training, seed)
    H, C = _heads(x_l, att)

    if attention_spec.runs_kernel("gatv2_forward", x_l.device.type, H, C, warp_row=True):
        colptr, csc_row, csc_perm = kernel_csc(graph, x_l, x_r, att, edge_feat)
        # x_l/x_r [N, H * C] and att [1, H, C] go in as they are: no view per call
        out, lse = torch.ops.neptune.gatv2_forward(
            x_l.contiguous(), x_r.contiguous(), att.contiguous(), graph.rowptr, graph.col, graph.eid,
            colptr, csc_row, csc_perm, None if edge_feat is None else edge_feat.contiguous(),
            float(negative_slope), p, seed)
        if not return_attention:
            return out
        return out, gatv2_attention_weights(x_l, x_r, att, graph, negative_slope, edge_feat, p, seed)

    res = _reference(x_l, x_r, att, edge_feat, graph.edge_index[0], graph.edge_index[1],
                     graph.num_dst, float(negative_slope), p, None if seed is None else int(seed),
                     return_attention)
    if return_attention:
        return res[0][:x_r.shape[0]], res[1]
    return res[:x_r.shape[0]]


def _reference(x_l, x_r, att, edge_feat, src, dst, rows, slope, p, seed, return_attention=False):
    """The reference on the op's inputs, in any of their forms: out [rows, ...] in the
    form of x_r (and alpha [E, H] with return_attention)."""
    H, C = _heads(x_l, att)
    res = gatv2_attention_reference(
        x_l.reshape(-1, H, C), _pad_rows(x_r.reshape(-1, H, C), rows), att.reshape(H, C), src, dst,
        rows, slope, edge_feat, p, seed, return_attention)
    out = res[0] if return_attention else res
    out = out.reshape((rows,) + tuple(x_r.shape[1:]))
    return (out, res[1]) if return_attention else out


def _pad_rows(x_r: torch.Tensor, rows: int) -> torch.Tensor:
    if x_r.shape[0] == rows:
        return x_r
    return torch.cat([x_r, x_r.new_zeros((rows - x_r.shape[0],) + tuple(x_r.shape[1:]))])


def gatv2_attention_weights(x_l, x_r, att, graph: Graph, negative_slope: float = 0.2,
                            edge_feat=None, dropout: float = 0.0, seed=None) -> torch.Tensor:
    """GATv2 attention weights [E, H] in the caller's edge order (differentiable).

    Materializes E x H x C values: call it when the weights are wanted, not in the hot path.
    Edges into destination rows beyond ``x_r`` (ignored by the op) get the weights of a
    softmax among themselves; callers drop them.
    """
    H, C = _heads(x_l, att)
    return gatv2_attention_weights_reference(
        x_l.reshape(-1, H, C), _pad_rows(x_r.reshape(-1, H, C), graph.num_dst), att.reshape(H, C),
        graph.edge_index[0],
        graph.edge_index[1], graph.num_dst, float(negative_slope), edge_feat, dropout,
        None if seed is None else int(seed))


SPEC = attention_spec.AttentionSpec(
    name="gatv2",
    out_shape=lambda x_l, x_r, att: tuple(x_r.shape),
    reference=_reference,
    heads=lambda x_l, x_r, att: att.shape[-2])

if _ext._C is not None and hasattr(torch.ops.neptune, "gatv2_forward"):
    attention_spec.register(SPEC)
