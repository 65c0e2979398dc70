"""GraphTransformer: a drop-in replacement for ``torch_geometric.nn.TransformerConv``.

Same constructor, same ``forward``, same parameter names and shapes (state_dicts load
both ways), same numbers. Attention and aggregation run in the fused graph-transformer
op (:func:`neptune_ext.ops.transformer_attention`): the per-edge [E, H, C] queries, keys,
values and messages TransformerConv builds are never materialized.
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from .spec import dropout_and_seed, runs_kernel
from .transformer import (projected_edges, transformer_attention, transformer_attention_weights,
                          transformer_edge_attention)
from .layer import AttentionBase, autocast_on, linear, materialize
from .projection import linear_weights, plain_linear, project, project_stack, projects_fresh

Tensor = torch.Tensor


class GraphTransformer(AttentionBase):
    r"""The graph transformer layer (Shi et al. 2021, "UniMP"), a drop-in for
    ``torch_geometric.nn.TransformerConv``.

    .. math::
        x'_i = W_s x_i + \sum_{j \in N(i)} \alpha_{ij} (W_v x_j + W_e e_{ij}),\qquad
        \alpha_{ij} = \mathrm{softmax}_j\Big(\frac{(W_q x_i)^\top (W_k x_j + W_e e_{ij})}{\sqrt{C}}\Big)

    Args mirror TransformerConv: ``in_channels`` (int, or ``(src, dst)``; ``-1`` is lazy),
    ``out_channels`` (C, per head), ``heads``, ``concat`` (else the heads are averaged),
    ``beta`` (gate the skip connection: ``out = b W_s x_i + (1 - b) out`` with
    ``b = sigmoid(w^T [out, W_s x_i, out - W_s x_i])``), ``dropout`` (on the attention
    weights, inside the fused kernel), ``edge_dim``, ``bias`` (of the key, query, value and
    skip projections), ``root_weight`` (add ``W_s x_i``).

    ``forward(x, edge_index, edge_attr=None, return_attention_weights=None)``: ``x`` a tensor
    or a ``(x_src, x_dst)`` pair; ``edge_index`` a COO ``[2, E]`` tensor, PyG's
    ``EdgeIndex``, a torch sparse adjacency ``[N_dst, N_src]`` or a
    :class:`neptune_ext.Graph`. As TransformerConv, passing ``return_attention_weights``
    as a bool (True *or* False) also returns ``(edge_index, alpha)``, alpha [E, H] before
    dropout. The graph is cached while the same ``edge_index`` tensor comes again (see
    :class:`GraphAttention`).

    Differences from TransformerConv: ``edge_attr`` without ``edge_dim`` is a ValueError
    (TransformerConv adds the raw attributes to the values); ``MessagePassing`` keyword
    arguments other than ``aggr="add"`` (``flow``, ``node_dim``, ...) are a TypeError; an
    uncoalesced sparse COO adjacency with ``edge_attr`` or attention weights, and a sparse
    adjacency carrying feature values, are ValueErrors (TransformerConv refuses the first and
    takes the second's values as ``edge_attr``); TorchScript's ``jittable`` is not offered
    (``torch.compile`` is); under ``torch.func`` transforms (``vmap``, ``grad``, ...) the
    layer computes through the pure-PyTorch reference.

    Example::

        >>> conv = GraphTransformer(16, 8, heads=4, beta=True)
        >>> out = conv(torch.randn(10, 16), torch.randint(0, 10, (2, 40)))
        >>> out.shape
        torch.Size([10, 32])
    """

    def __init__(self, in_channels: Union[int, Tuple[int, int]], out_channels: int, heads: int = 1,
                 concat: bool = True, beta: bool = False, dropout: float = 0.0,
                 edge_dim: Optional[int] = None, bias: bool = True, root_weight: bool = True,
                 **kwargs):
        if kwargs.get("aggr", "add") != "add":
            raise ValueError(f"aggr: GraphTransformer aggregates with 'add' (softmax attention), "
                             f"got {kwargs['aggr']!r}")
        unknown = sorted(set(kwargs) - {"aggr"})
        if unknown:
            raise TypeError(f"GraphTransformer got unexpected keyword arguments {unknown}")
        super().__init__(in_channels, out_channels, heads, concat, 0.2, dropout, False, edge_dim,
                         "mean", False)
        del self.negative_slope, self.residual  # GAT's, not this layer's
        self.beta = bool(beta) and root_weight
        self.root_weight = root_weight
        self._alpha = None  # TransformerConv's attribute (always None between calls)
        HC = heads * out_channels
        pair = not isinstance(in_channels, int)
        src_in, dst_in = (in_channels[0], in_channels[1]) if pair else (in_channels, in_channels)
        src_name, dst_name = ("in_channels[0]", "in_channels[1]") if pair else ("in_channels",) * 2
        self.lin_key = linear(src_in, HC, src_name, bias=bias)
        self.lin_query = linear(dst_in, HC, dst_name, bias=bias)
        self.lin_value = linear(src_in, HC, src_name, bias=bias)
        self.lin_edge = linear(edge_dim, HC, "edge_dim") if edge_dim is not None else None
        skip_out = HC if concat else out_channels
        self.lin_skip = linear(dst_in, skip_out, dst_name, bias=bias)
        self.lin_beta = nn.Linear(3 * skip_out, 1, bias=False) if self.beta else None
        self.reset_parameters()

    def reset_parameters(self):
        for lin in (self.lin_key, self.lin_query, self.lin_value, self.lin_edge, self.lin_skip,
                    self.lin_beta):
            if lin is not None and not isinstance(lin, nn.modules.lazy.LazyModuleMixin):
                lin.reset_parameters()

    def forward(self, x, edge_index, edge_attr: Optional[Tensor] = None,
                return_attention_weights: Optional[bool] = None):
        H, C = self.heads, self.out_channels
        x_src, x_dst, same = self._split_x(x)
        want_alpha = isinstance(return_attention_weights, bool)
        self._check_edge_order(edge_index, edge_attr, want_alpha)
        if x_dst is None:
            raise ValueError("x: GraphTransformer needs destination features (x_dst is None); "
                             "pass x as a tensor or a (x_src, x_dst) pair of tensors")
        for lin, inp, name in ((self.lin_key, x_src, "x_src"), (self.lin_value, x_src, "x_src"),
                               (self.lin_query, x_dst, "x_dst"), (self.lin_skip, x_dst, "x_dst")):
            materialize(lin, inp, "x" if same else name, glorot_init=False)
        num_src, num_dst = self._sizes(x_src, x_dst, edge_index, None)
        prepared = self._prepare(edge_index, num_src, num_dst)
        graph = prepared.graph
        scale = 1.0 / math.sqrt(C)

        edge_attr_2d = self._edges_inside(x_src, edge_attr)
        if edge_attr_2d is not None:
            q = project(self.lin_query, x_dst).view(-1, H, C)
            return self._forward_projected_edges(x_src, x_dst, q, edge_attr_2d, prepared, scale,
                                                 edge_index, want_alpha)
        x_r = None
        if same:  # one input: the query, key, value (and skip) projections in one GEMM where it can
            q, k, v, *skip = project_stack((self.lin_query, self.lin_key, self.lin_value)
                                           + ((self.lin_skip,) if self.root_weight else ()), x_src)
            x_r = skip[0] if skip else None
        else:
            q, k, v = (project(m, t) for m, t in ((self.lin_query, x_dst), (self.lin_key, x_src),
                                                  (self.lin_value, x_src)))
        q, k, v = (t.view(-1, H, C) for t in (q, k, v))
        edge_feat = self._edge_features(prepared, edge_attr, glorot_init=False)

        alpha = None
        if self._explaining():
            p, seed = dropout_and_seed(self.dropout, self.training, None)
            alpha = transformer_attention_weights(q, k, graph, scale, edge_feat)
            kept = alpha if p == 0.0 else transformer_attention_weights(q, k, graph, scale, edge_feat, p, seed)
            out = self.propagate(graph.edge_index, x=(v, None), alpha=kept, edge_value=edge_feat,
                                 size=(num_src, num_dst))
        else:
            out = transformer_attention(q, k, v, graph, scale, edge_feat, self.dropout, self.training)
            if want_alpha:
                alpha = transformer_attention_weights(q, k, graph, scale, edge_feat)

        return self._finish(out, x_dst, edge_index, graph, alpha, want_alpha, x_r)

    def _edges_inside(self, x_src: Tensor, edge_attr) -> Optional[Tensor]:
        """edge_attr as [E, edge_dim] (lin_edge sized from it) when lin_edge can be applied
        inside the op, else None: edge features and a kernel for them,
        no explainer, and key/value/edge projections that are plain Linears computing exactly
        ``x W^T + b`` (no hooks, no parametrization or subclass: their weights are used
        directly) on edge features of lin_edge's dtype (or under autocast, which casts both;
        otherwise lin_edge raises as TransformerConv's does, on the path that calls it)."""
        if edge_attr is None or self.lin_edge is None or self._explaining():
            return None
        if not runs_kernel("transformer_edge_forward", x_src.device.type):
            return None
        if not all(plain_linear(m) for m in (self.lin_key, self.lin_value, self.lin_edge)):
            return None
        edge_attr = self._edge_attr_2d(edge_attr)
        materialize(self.lin_edge, edge_attr, "edge_attr", glorot_init=False)
        same_dtype = edge_attr.dtype == self.lin_edge.weight.dtype
        return edge_attr if autocast_on(x_src.device.type) or same_dtype else None

    def _forward_projected_edges(self, x_src, x_dst, q, edge_attr, prepared, scale, edge_index,
                                 want_alpha):
        """With edge features, where the kernel runs: the keys and values from one GEMM
        ([N_src, 2, H, C]) and lin_edge applied inside the op (transformer_edge_attention),
        so neither lin_edge(edge_attr) [E, H * C] nor its gradient is ever held. edge_attr:
        [E, edge_dim], from _edges_inside."""
        H, C = self.heads, self.out_channels
        edge_attr = self._edge_attr(prepared, edge_attr)
        bias = None if self.lin_key.bias is None else torch.cat([self.lin_key.bias, self.lin_value.bias])
        kv = linear_weights(x_src, torch.cat([self.lin_key.weight, self.lin_value.weight]), bias).view(-1, 2, H, C)
        w_edge = self.lin_edge.weight.view(H, C, -1)
        if autocast_on(x_src.device.type):  # lin_edge's output would be in autocast's dtype
            w_edge, edge_attr = w_edge.to(kv.dtype), edge_attr.to(kv.dtype)
        graph = prepared.graph
        out = transformer_edge_attention(q, kv, w_edge, graph, scale, edge_attr, self.dropout, self.training)
        alpha = None
        if want_alpha:
            alpha = transformer_attention_weights(q, kv[:, 0], graph, scale, projected_edges(w_edge, edge_attr))
        return self._finish(out, x_dst, edge_index, graph, alpha, want_alpha)

    def _finish(self, out, x_dst, edge_index, graph, alpha, want_alpha, x_r=None):
        """The heads concatenated or averaged, the skip x_r = lin_skip(x_dst) (given, or
        projected here) added or gated, and the attention weights if wanted."""
        H, C = self.heads, self.out_channels
        out = out.reshape(-1, H * C) if self.concat else out.mean(dim=1)
        if self.concat and not self.root_weight and torch.is_grad_enabled() and out.requires_grad:
            # the op's own output, which its autograd saved: a copy, so that a user's in-place
            # op on what the layer returns (fine on TransformerConv) cannot fail the backward
            out = out.clone()
        if self.root_weight:
            if x_r is None:
                x_r = project(self.lin_skip, x_dst)
            if self.lin_beta is not None:
                b = self.lin_beta(torch.cat([out, x_r, out - x_r], dim=-1)).sigmoid()
                out = b * x_r + (1 - b) * out
            elif x_r._base is None and projects_fresh(self.lin_skip, x_dst):
                # the skip is the op's own new tensor (not a slice of stacked projections,
                # whose siblings the attention op saved): the sum lands in it, not in a new
                # buffer whose pages fault in (a large graph's [N, H C])
                out = x_r.add_(out)
            else:
                out = out + x_r
        if not want_alpha:
            return out
        # As TransformerConv: the edge_index (or adjacency) as given, alpha in its edge order.
        return out, (edge_index if isinstance(edge_index, Tensor) else graph.edge_index, alpha)

    def message(self, x_j: Tensor, alpha: Tensor, edge_value: Optional[Tensor] = None) -> Tensor:
        if edge_value is not None:
            x_j = x_j + edge_value
        return x_j * alpha.unsqueeze(-1)
