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
from .._util import check as _check, is_compiling as _is_compiling, promote
from ..graph import Graph
from ..reference import gatv2_attention_reference, gatv2_attention_weights_reference
from . import attention_spec
from .attention_spec import dropout_and_seed, kernel_csc
from .graph_attention import check_slope

__all__ = ["gatv2_attention", "gatv2_attention_weights"]


def _validate(x_l, x_r, att, graph, negative_slope, edge_feat, dropout):
    attention_spec.check_tensors(graph, (("x_l", x_l), ("x_r", x_r), ("att", att)))
    _check(x_l.dim() == 3, lambda: f"x_l must have shape [N_src, H, C], got {list(x_l.shape)}")
    n_src, H, C = x_l.shape
    _check(x_r.dim() == 3 and tuple(x_r.shape[1:]) == (H, C),
           lambda: f"x_r must have shape [N_dst, H, C] with H, C = {H}, {C}, got {list(x_r.shape)}")
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
        x_l: [N_src, H, C] source features (gathered per edge, summed into the output).
        x_r: [N_dst, H, C] destination features. The graph may have more destination
            rows than ``x_r``: edges into those rows are ignored (zero weight, no output).
        att: [H, C] (or [1, H, C]) attention vector per head.
        graph: a :class:`neptune_ext.Graph` with ``num_src = N_src``, ``num_dst >= N_dst``.
        negative_slope: LeakyReLU slope.
        edge_feat: optional [E, H, C] edge features added to ``z``, caller's edge order.
        dropout: attention dropout probability, applied when ``training``.
        return_attention: also return the attention weights [E, H] (after dropout).
        seed: optional CPU int64 scalar tensor fixing the dropout mask.

    Returns:
        out [N_dst, H, C], or (out, alpha) with ``return_attention=True``. Inputs of
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
    if not _is_compiling():
        _validate(x_l, x_r, att, graph, negative_slope, edge_feat, dropout)
    x_l, x_r, att, edge_feat = promote(x_l, x_r, att, edge_feat)
    p, seed = dropout_and_seed(dropout, training, seed, x_l.device)
    H, C = x_l.shape[1], x_l.shape[2]
    att2 = att.reshape(H, C)

    if attention_spec.runs_kernel("gatv2_forward", x_l.device.type, H, C, warp_row=True):
        colptr, csc_row, csc_perm = kernel_csc(graph, x_l, x_r, att, edge_feat)
        out, lse = torch.ops.neptune.gatv2_forward(
            x_l.contiguous(), x_r.contiguous(), att2.contiguous(), graph.rowptr, graph.col, graph.eid,
            colptr, csc_row, csc_perm, None if edge_feat is None else edge_feat.contiguous(),
            float(negative_slope), p, seed)
        if not return_attention:
            return out
        return out, gatv2_attention_weights(x_l, x_r, att2, graph, negative_slope, edge_feat, p, seed)

    n_dst = x_r.shape[0]
    x_r_all = _pad_rows(x_r, graph.num_dst)
    res = gatv2_attention_reference(
        x_l, x_r_all, att2, graph.edge_index[0], graph.edge_index[1], graph.num_dst,
        float(negative_slope), edge_feat, p, None if seed is None else int(seed), return_attention)
    if return_attention:
        return res[0][:n_dst], res[1]
    return res[:n_dst]


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
    H, C = x_l.shape[1], x_l.shape[2]
    return gatv2_attention_weights_reference(
        x_l, _pad_rows(x_r, graph.num_dst), att.reshape(H, C), graph.edge_index[0],
        graph.edge_index[1], graph.num_dst, float(negative_slope), edge_feat, dropout,
        None if seed is None else int(seed))


SPEC = attention_spec.AttentionSpec(
    name="gatv2",
    out_shape=lambda x_l, x_r, att: tuple(x_r.shape),
    reference=lambda x_l, x_r, att, ef, src, dst, rows, slope, p, seed: gatv2_attention_reference(
        x_l, _pad_rows(x_r, rows), att, src, dst, rows, slope, ef, p, seed))

if _ext._C is not None and hasattr(torch.ops.neptune, "gatv2_forward"):
    attention_spec.register(SPEC)
