"""Sparse graph attention: validation, autograd, fake kernels, dispatch.

    s_ij  = LeakyReLU(score_src[j] + score_dst[i] (+ edge_logits[e(i,j)]))
    a_ij  = softmax over j in N(i) of s_ij          (per head)
    out_i = sum_j a_ij * h[j]                        (no in-edges: 0)

The compiled kernels (torch.ops.neptune.gat_forward / gat_backward) are fused:
no per-edge feature tensor in forward, deterministic backward without atomics.
Without the extension, the pure-PyTorch reference (neptune_ext.attention.reference) runs.
"""
import math
from typing import Optional, Tuple, Union

import torch

from .. import _ext
from .._util import check as _check, promote
from ..graph import Graph
from .reference import attention_weights_reference, sparse_graph_attention_reference
from . import spec as attention_spec
from .spec import dropout_and_seed, kernel_csc

__all__ = ["sparse_graph_attention", "attention_weights", "check_slope"]


def check_slope(negative_slope) -> None:
    """ValueError unless ``negative_slope`` is a finite real number."""
    _check(isinstance(negative_slope, (int, float)) and not isinstance(negative_slope, bool)
           and math.isfinite(negative_slope),
           lambda: f"negative_slope must be a finite float, got {negative_slope!r}")


def _validate(h, score_src, score_dst, graph, negative_slope, edge_logits, dropout):
    attention_spec.check_tensors(graph, (("h", h), ("score_src", score_src), ("score_dst", score_dst)))
    _check(h.dim() == 3, lambda: f"h must have shape [N_src, H, C], got {list(h.shape)}")
    n_src, H, _ = h.shape
    _check(score_src.shape == (n_src, H),
           lambda: f"score_src must have shape [N_src, H] = [{n_src}, {H}], got {list(score_src.shape)}")
    _check(score_dst.dim() == 2 and score_dst.shape[1] == H,
           lambda: f"score_dst must have shape [N_dst, H] with H = {H}, got {list(score_dst.shape)}")
    _check(n_src == graph.num_src,
           lambda: f"h has {n_src} source nodes but the graph has num_src = {graph.num_src}")
    _check(score_dst.shape[0] == graph.num_dst,
           lambda: f"score_dst has {score_dst.shape[0]} destination nodes but the graph has num_dst = {graph.num_dst}")
    attention_spec.check_placement(graph, ("h", h), (("score_src", score_src), ("score_dst", score_dst)),
                                   ("edge_logits", edge_logits), (graph.num_edges, H), dropout)
    check_slope(negative_slope)


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
    h, score_src, score_dst, edge_logits, p, seed = attention_spec.enter(
        _validate, h, score_src, score_dst, graph, negative_slope, edge_logits, dropout, training, seed)

    if attention_spec.runs_kernel("gat_forward", h.device.type):
        colptr, csc_row, csc_perm = kernel_csc(graph, h, score_src, score_dst, edge_logits)
        out, lse = torch.ops.neptune.gat_forward(
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


SPEC = attention_spec.AttentionSpec(
    name="gat",
    out_shape=lambda h, ss, sd: (sd.shape[0], h.shape[1], h.shape[2]),
    reference=lambda h, ss, sd, el, src, dst, rows, slope, p, seed: sparse_graph_attention_reference(
        h, ss, sd, src, dst, rows, slope, el, p, seed))


def gat_self_attention(h: torch.Tensor, att_src: torch.Tensor, att_dst: torch.Tensor, graph: Graph,
                       negative_slope: float, edge_logits: Optional[torch.Tensor], dropout: float,
                       training: bool, seed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The GraphAttention layer's step when sources and destinations are the same N nodes:
    ``sparse_graph_attention(h, <h, att_src>, <h, att_dst>, graph)[:N]`` in one op call
    (``neptune::gat_att_forward``; the logit halves, the phantom row of removed self loops
    and the gradients of ``att_src``/``att_dst`` are computed inside). ``graph`` may have
    more destination rows than N (their outputs are dropped). Only for inputs the layer
    built (h from its projection, the graph from its cache): the shapes are its own; the
    placement is checked. Callers check :func:`gat_self_runs` first."""
    H, C = h.shape[1], h.shape[2]
    attention_spec.check_placement(graph, ("x", h), (), ("edge_attr", edge_logits),
                                   (graph.num_edges, H), dropout)
    h, att_src, att_dst, edge_logits = promote(h, att_src, att_dst, edge_logits)
    p, seed = dropout_and_seed(dropout, training, seed, h.device)
    colptr, csc_row, csc_perm = kernel_csc(graph, h, att_src, att_dst, edge_logits)
    out, _ = torch.ops.neptune.gat_att_forward(
        h.contiguous(), att_src.reshape(H, C).contiguous(), att_dst.reshape(H, C).contiguous(),
        graph.rowptr, graph.col, graph.eid, colptr, csc_row, csc_perm,
        None if edge_logits is None else edge_logits.contiguous(), float(negative_slope), p, seed)
    return out


def gat_self_runs(device_type: str) -> bool:
    """Whether :func:`gat_self_attention`'s kernel runs here (else the layer takes the
    general path, which falls back to the reference)."""
    return attention_spec.runs_kernel("gat_att_forward", device_type)


def _gat_self_reference(h, att_src, att_dst, edge_logits, src, dst, rows, slope, p, seed):
    score_dst = (h * att_dst).sum(-1)
    if rows > h.shape[0]:
        score_dst = torch.cat([score_dst, score_dst.new_zeros(rows - h.shape[0], h.shape[1])])
    out = sparse_graph_attention_reference(h, (h * att_src).sum(-1), score_dst, src, dst, rows,
                                           slope, edge_logits, p, seed)
    return out[:h.shape[0]]


SELF_SPEC = attention_spec.AttentionSpec(
    name="gat_att",
    out_shape=lambda h, a_s, a_d: tuple(h.shape),
    reference=_gat_self_reference,
    lse_rows=lambda rowptr: rowptr.shape[0] - 1)

if _ext._C is not None:
    attention_spec.register(SPEC)
    attention_spec.register(SELF_SPEC)
