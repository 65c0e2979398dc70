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

__all__ = ["transformer_attention", "transformer_attention_weights"]


def _validate(q, k, v, graph, scale, edge_feat, dropout):
    attention_spec.check_tensors(graph, (("q", q), ("k", k), ("v", v)))
    _check(q.dim() == 3 and q.shape[2] > 0, lambda: f"q must have shape [N_dst, H, C] with C > 0, got {list(q.shape)}")
    H, C = q.shape[1], q.shape[2]
    _check(k.dim() == 3 and tuple(k.shape[1:]) == (H, C),
           lambda: f"k must have shape [N_src, H, C] with H, C = {H}, {C}, got {list(k.shape)}")
    _check(tuple(v.shape) == tuple(k.shape), lambda: f"v must have the shape of k, {list(k.shape)}, got {list(v.shape)}")
    _check(k.shape[0] == graph.num_src, lambda: f"k has {k.shape[0]} source nodes but the graph has num_src = {graph.num_src}")
    _check(q.shape[0] == graph.num_dst,
           lambda: f"q has {q.shape[0]} destination nodes but the graph has num_dst = {graph.num_dst}")
    attention_spec.check_placement(graph, ("q", q), (("k", k), ("v", v)), ("edge_feat", edge_feat),
                                   (graph.num_edges, H, C), dropout)
    _check(scale is None or (isinstance(scale, (int, float)) and not isinstance(scale, bool)
                             and math.isfinite(scale)), lambda: f"scale must be None or a finite float, got {scale!r}")


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
        colptr, csc_row, csc_perm = kernel_csc(graph, q, k, v, edge_feat)
        out, lse = torch.ops.neptune.transformer_forward(
            q.contiguous(), k.contiguous(), v.contiguous(), graph.rowptr, graph.col, graph.eid,
            colptr, csc_row, csc_perm, None if edge_feat is None else edge_feat.contiguous(),
            scale, p, seed)
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


SPEC = attention_spec.AttentionSpec(
    name="transformer",
    out_shape=lambda q, k, v: tuple(q.shape),
    reference=lambda q, k, v, e, src, dst, rows, scale, p, seed: transformer_attention_reference(
        q, k, v, src, dst, rows, scale, e, p, seed))

if _ext._C is not None and hasattr(torch.ops.neptune, "transformer_forward"):
    attention_spec.register(SPEC)
