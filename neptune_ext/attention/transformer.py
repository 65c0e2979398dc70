"""Graph-transformer attention (PyG's TransformerConv): validation, dispatch, registration.

    k'_ij = k[j] (+ edge_feat[e(i,j)]),  v'_ij = v[j] (+ edge_feat[e(i,j)])
    a_ij  = softmax over j in N(i) of scale * <q[i], k'_ij>      (per head)
    out_i = sum_j a_ij v'_ij                                      (no in-edges: 0)

The compiled op (torch.ops.neptune.transformer_forward / _backward; CPU, and CUDA for
H * C <= 1024 - the CUDA kernels have run only under the CPU warp emulator so far) runs one pass
per destination with an online softmax and allocates nothing of size E x H x C; its
backward is deterministic (no atomics). Its registration is the shared attention spec
(:mod:`neptune_ext.attention.spec`). Without a kernel for the device the pure-PyTorch
reference runs.
"""
import math
from typing import Optional, Tuple, Union

import torch

from .. import _ext
from .._util import check as _check
from ..graph import Graph
from .reference import transformer_attention_reference, transformer_attention_weights_reference
from . import spec as attention_spec
from .spec import kernel_csc

__all__ = ["transformer_attention", "transformer_attention_weights", "transformer_edge_attention"]


def _run(op, a, b, c, graph: Graph, edge, scale: float, p: float, seed):
    """The output of a transformer op's kernel (the transposed graph only when backward will
    need it)."""
    colptr, csc_row, csc_perm = kernel_csc(graph, a, b, c, edge)
    out, _ = op(a.contiguous(), b.contiguous(), c.contiguous(), graph.rowptr, graph.col, graph.eid,
                colptr, csc_row, csc_perm, None if edge is None else edge.contiguous(), scale, p, seed)
    return out


def _check_q_and_scale(q, graph, scale):
    """The checks both transformer ops make of the queries and the scale."""
    _check(q.dim() == 3 and q.shape[2] > 0, lambda: f"q must have shape [N_dst, H, C] with C > 0, got {list(q.shape)}")
    _check(q.shape[0] == graph.num_dst,
           lambda: f"q has {q.shape[0]} destination nodes but the graph has num_dst = {graph.num_dst}")
    _check(scale is None or (isinstance(scale, (int, float)) and not isinstance(scale, bool)
                             and math.isfinite(scale)), lambda: f"scale must be None or a finite float, got {scale!r}")


def _validate(q, k, v, graph, scale, edge_feat, dropout):
    attention_spec.check_tensors(graph, (("q", q), ("k", k), ("v", v)))
    _check_q_and_scale(q, graph, scale)
    H, C = q.shape[1], q.shape[2]
    _check(k.dim() == 3 and tuple(k.shape[1:]) == (H, C),
           lambda: f"k must have shape [N_src, H, C] with H, C = {H}, {C}, got {list(k.shape)}")
    _check(tuple(v.shape) == tuple(k.shape), lambda: f"v must have the shape of k, {list(k.shape)}, got {list(v.shape)}")
    _check(k.shape[0] == graph.num_src, lambda: f"k has {k.shape[0]} source nodes but the graph has num_src = {graph.num_src}")
    attention_spec.check_placement(graph, ("q", q), (("k", k), ("v", v)), ("edge_feat", edge_feat),
                                   (graph.num_edges, H, C), dropout)


def transformer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, graph: Graph,
                          scale: Optional[float] = None, edge_feat: Optional[torch.Tensor] = None,
                          dropout: float = 0.0, training: bool = False, return_attention: bool = False,
                          seed: Optional[torch.Tensor] = None
                          ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Fused graph-transformer attention + aggregation.

    Args:
        q: [N_dst, H, C] queries.
        k: [N_src, H, C] keys, v: [N_src, H, C] values (gathered per edge).
        graph: a :class:`neptune_ext.Graph` with ``num_src = N_src``, ``num_dst = N_dst``.
        scale: logit scale (default ``1 / sqrt(C)``, as TransformerConv).
        edge_feat: optional [E, H, C] edge features added to the keys and the values, in the
            caller's edge order.
        dropout: attention dropout probability, applied when ``training``.
        return_attention: also return the attention weights [E, H] (after dropout).
        seed: optional CPU int64 scalar tensor fixing the dropout mask.

    Returns:
        out [N_dst, H, C], or (out, alpha). Inputs of different floating dtypes are computed
        in their promoted dtype. Differentiable twice (a ``create_graph=True`` backward
        recomputes the gradients with the differentiable reference).

    Example::

        >>> g = Graph.from_edge_index(torch.tensor([[0, 1, 2], [1, 2, 1]]))
        >>> x = torch.randn(3, 2, 8)
        >>> transformer_attention(x, x, x, g).shape
        torch.Size([3, 2, 8])
    """
    q, k, v, edge_feat, p, seed = attention_spec.enter(
        _validate, q, k, v, graph, scale, edge_feat, dropout, training, seed)
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else float(scale)

    if attention_spec.runs_kernel("transformer_forward", q.device.type, q.shape[1], q.shape[2],
                                  warp_row=True):
        out = _run(torch.ops.neptune.transformer_forward, q, k, v, graph, edge_feat, scale, p, seed)
        if not return_attention:
            return out
        return out, transformer_attention_weights(q, k, graph, scale, edge_feat, p, seed)

    src, dst = graph.edge_index[0], graph.edge_index[1]
    return transformer_attention_reference(q, k, v, src, dst, graph.num_dst, scale, edge_feat, p,
                                           None if seed is None else int(seed), return_attention)


def transformer_attention_weights(q, k, graph: Graph, scale: Optional[float] = None, edge_feat=None,
                                  dropout: float = 0.0, seed=None) -> torch.Tensor:
    """Graph-transformer attention weights [E, H] in the caller's edge order (differentiable).

    Materializes E x H x C values: call it when the weights are wanted, not in the hot path.
    """
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else float(scale)
    return transformer_attention_weights_reference(
        q, k, graph.edge_index[0], graph.edge_index[1], graph.num_dst, scale, edge_feat, dropout,
        None if seed is None else int(seed))


# ----------------------------------------------------------------------------
# The edge features projected inside: TransformerConv with edge_dim, without its
# [E, H * C] lin_edge(edge_attr).

def projected_edges(w_edge: torch.Tensor, edge_attr: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The [E, H, C] edge features W_e a_e that ``w_edge`` [H, C, D] makes of ``edge_attr``
    [E, D] (None without edge_attr): what the op computes without materializing."""
    return None if edge_attr is None else torch.einsum("hcd,ed->ehc", w_edge, edge_attr)


def _validate_edge(q, kv, w_edge, graph, scale, edge_attr, dropout):
    attention_spec.check_tensors(graph, (("q", q), ("kv", kv), ("w_edge", w_edge)))
    _check_q_and_scale(q, graph, scale)
    H, C = q.shape[1], q.shape[2]
    _check(kv.dim() == 4 and tuple(kv.shape[1:]) == (2, H, C),
           lambda: f"kv must have shape [N_src, 2, H, C] with H, C = {H}, {C}, got {list(kv.shape)}")
    _check(w_edge.dim() == 3 and tuple(w_edge.shape[:2]) == (H, C),
           lambda: f"w_edge must have shape [H, C, D] with H, C = {H}, {C}, got {list(w_edge.shape)}")
    _check(kv.shape[0] == graph.num_src, lambda: f"kv has {kv.shape[0]} source nodes but the graph has num_src = {graph.num_src}")
    if edge_attr is not None:
        D = w_edge.shape[2]
        _check(isinstance(edge_attr, torch.Tensor) and edge_attr.is_floating_point(),
               lambda: "edge_attr must be a floating-point tensor of shape [E, D]")
        _check(tuple(edge_attr.shape) == (graph.num_edges, D),
               lambda: f"edge_attr must have shape [E, D] = {[graph.num_edges, D]} (D: w_edge's last "
                       f"dimension), got {list(edge_attr.shape)}")
        _check(edge_attr.device == q.device, lambda: f"edge_attr is on {edge_attr.device} but q is on {q.device}")
    attention_spec.check_placement(graph, ("q", q), (("kv", kv), ("w_edge", w_edge)), ("edge_attr", None),
                                   None, dropout)


def transformer_edge_attention(q: torch.Tensor, kv: torch.Tensor, w_edge: torch.Tensor, graph: Graph,
                               scale: Optional[float] = None, edge_attr: Optional[torch.Tensor] = None,
                               dropout: float = 0.0, training: bool = False, return_attention: bool = False,
                               seed: Optional[torch.Tensor] = None
                               ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """:func:`transformer_attention` with the edge features projected inside: the keys and
    values ``kv[:, 0]``, ``kv[:, 1]`` ([N_src, 2, H, C], as one Linear of the sources gives
    them) and the edge features ``W_e a_e`` of ``edge_attr`` [E, D] with ``w_edge`` [H, C, D]
    (TransformerConv's ``lin_edge.weight.view(H, C, D)``), which are never materialized: the
    projection is applied to the row's query and to its weighted sum of ``a_e`` instead, so
    an edge costs D-wide work and nothing of size E x H x C exists. Equal to
    ``transformer_attention(q, kv[:, 0], kv[:, 1], graph, scale, edge_feat=W_e a_e)``.
    Gradients for q, kv, w_edge and edge_attr. The compiled kernel is CPU-only; elsewhere
    the reference runs (GraphTransformer then calls :func:`transformer_attention` instead)."""
    q, kv, w_edge, edge_attr, p, seed = attention_spec.enter(
        _validate_edge, q, kv, w_edge, graph, scale, edge_attr, dropout, training, seed)
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else float(scale)
    if edge_attr is None:  # w_edge takes no part (and gets no gradient)
        return transformer_attention(q, kv[:, 0], kv[:, 1], graph, scale, None, p, p > 0.0,
                                     return_attention, seed)
    if attention_spec.runs_kernel("transformer_edge_forward", q.device.type):
        out = _run(torch.ops.neptune.transformer_edge_forward, q, kv, w_edge, graph, edge_attr, scale, p, seed)
        if not return_attention:
            return out
        return out, transformer_attention_weights(q, kv[:, 0], graph, scale, projected_edges(w_edge, edge_attr),
                                                  p, seed)
    src, dst = graph.edge_index[0], graph.edge_index[1]
    return _edge_reference(q, kv, w_edge, edge_attr, src, dst, graph.num_dst, scale, p,
                           None if seed is None else int(seed), return_attention)


def _edge_reference(q, kv, w_edge, edge_attr, src, dst, rows, scale, p, seed, return_attention=False):
    return transformer_attention_reference(q, kv[:, 0], kv[:, 1], src, dst, rows, scale,
                                           projected_edges(w_edge, edge_attr), p, seed, return_attention)


SPEC = attention_spec.AttentionSpec(
    name="transformer",
    out_shape=lambda q, k, v: tuple(q.shape),
    reference=lambda q, k, v, e, src, dst, rows, scale, p, seed: transformer_attention_reference(
        q, k, v, src, dst, rows, scale, e, p, seed))
EDGE_SPEC = attention_spec.AttentionSpec(
    name="transformer_edge",
    out_shape=lambda q, kv, w: tuple(q.shape),
    reference=lambda q, kv, w, e, src, dst, rows, scale, p, seed: _edge_reference(
        q, kv, w, e, src, dst, rows, scale, p, seed))

if _ext._C is not None and hasattr(torch.ops.neptune, "transformer_forward"):
    attention_spec.register(SPEC)
if _ext._C is not None and hasattr(torch.ops.neptune, "transformer_edge_forward"):
    attention_spec.register(EDGE_SPEC)
