"""GraphAttention: a drop-in replacement for ``torch_geometric.nn.GATConv``.

Same constructor, same ``forward``, same parameter names and shapes (a GATConv
``state_dict`` loads unchanged), same numbers. The attention and aggregation run
in the fused op (:func:`neptune_ext.ops.sparse_graph_attention`), so no per-edge
feature tensor is built; the CSR graph (and its transpose, for backward) is
cached while the same ``edge_index`` tensor is passed again.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from .spec import dropout_and_seed
from .gat import (attention_weights, gat_self_attention, gat_self_runs,
                                   sparse_graph_attention)
from .layer import AttentionBase, glorot, linear, autocast_on, head_weights, materialize, reset_linear
from .projection import project

Tensor = torch.Tensor


class GraphAttention(AttentionBase):
    r"""Graph attention layer (GAT v1), a drop-in for ``torch_geometric.nn.GATConv``.

    .. math::
        x'_i = \sum_{j \in N(i) \cup \{i\}} \alpha_{ij} W x_j,\qquad
        \alpha_{ij} = \mathrm{softmax}_j\big(\mathrm{LeakyReLU}(a_s^\top W x_j + a_d^\top W x_i
        (+ a_e^\top W_e e_{ij}))\big)

    Args mirror GATConv: ``in_channels`` (int, or ``(src, dst)`` for bipartite
    graphs), ``out_channels``, ``heads``, ``concat``, ``negative_slope``,
    ``dropout`` (on the attention weights, inside the fused kernel),
    ``add_self_loops``, ``edge_dim``, ``fill_value`` (float, tensor, or
    ``"mean"|"add"|"sum"|"min"|"max"|"mul"``), ``bias``, ``residual``.

    ``forward(x, edge_index, edge_attr=None, size=None, return_attention_weights=None)``
    takes ``x`` as a tensor or a ``(x_src, x_dst)`` pair and ``edge_index`` as a COO
    ``[2, E]`` tensor, a :class:`neptune_ext.Graph` (used as is: no self loops are
    added or removed) or a torch sparse COO/CSR adjacency of shape [N_dst, N_src].

    ``in_channels=-1`` (or ``-1`` in the pair) sizes the projection on the first call,
    as in PyG. Bad node ids raise ValueError on every path (also under torch.compile).

    The graph built from an ``edge_index`` tensor is cached while the very same tensor
    object comes again unchanged (shape, strides, offset, dtype, device and torch's
    version counter, which every in-place write bumps). Writes that bypass the version
    counter (through ``.data``, ``.numpy()`` or DLPack) are not seen: call
    :meth:`clear_graph_cache` after them, or set ``conv.cache_graph = False``.

    Example::

        >>> conv = GraphAttention(16, 8, heads=4)
        >>> out = conv(torch.randn(10, 16), torch.randint(0, 10, (2, 40)))
        >>> out.shape
        torch.Size([10, 32])
    """

    def __init__(self, in_channels: Union[int, Tuple[int, int]], out_channels: int, heads: int = 1,
                 concat: bool = True, negative_slope: float = 0.2, dropout: float = 0.0,
                 add_self_loops: bool = True, edge_dim: Optional[int] = None,
                 fill_value: Union[float, Tensor, str] = "mean", bias: bool = True,
                 residual: bool = False):
        super().__init__(in_channels, out_channels, heads, concat, negative_slope, dropout,
                         add_self_loops, edge_dim, fill_value, residual)
        HC = heads * out_channels

        self.lin = self.lin_src = self.lin_dst = None
        if isinstance(in_channels, int):
            self.lin = linear(in_channels, HC, "in_channels")
        else:
            self.lin_src = linear(in_channels[0], HC, "in_channels[0]")
            self.lin_dst = linear(in_channels[1], HC, "in_channels[1]")
        self.att_src = nn.Parameter(torch.empty(1, heads, out_channels))
        self.att_dst = nn.Parameter(torch.empty(1, heads, out_channels))
        if edge_dim is not None:
            self.lin_edge = linear(edge_dim, HC, "edge_dim")
            self.att_edge = nn.Parameter(torch.empty(1, heads, out_channels))
        else:
            self.lin_edge = None
            self.register_parameter("att_edge", None)
        self._residual_and_bias(bias)
        self.reset_parameters()

    def reset_parameters(self):
        for lin in (self.lin, self.lin_src, self.lin_dst, self.lin_edge, self.res):
            reset_linear(lin)
        glorot(self.att_src)
        glorot(self.att_dst)
        glorot(self.att_edge)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    # "auto" | "x" | "h": where the attention halves are computed from on the general path
    # (bipartite inputs, attention weights, explainers, the reference). Same-node inputs on the
    # kernels compute them from h inside neptune::gat_att.
    scores_from = "auto"

    def _scores_from_h(self, same: bool, x: Tensor, H: int, C: int) -> bool:
        if not same or self.lin is None:  # h_dst would cost a second projection
            return False
        if self.scores_from != "auto":
            return self.scores_from == "h"
        return x.shape[1] > H * C

    def _edge_logits(self, prepared, edge_attr: Optional[Tensor]) -> Optional[Tensor]:
        """The edge half of the logits [E', H] in the graph's edge order, or None."""
        if edge_attr is None or self.lin_edge is None:
            return None
        H, C = self.heads, self.out_channels
        edge_attr = self._edge_attr_2d(edge_attr)
        materialize(self.lin_edge, edge_attr, "edge_attr")
        edge_attr = self._edge_attr(prepared, edge_attr)
        # a_e^T W_e e = (W_e^T a_e)^T e: project the attention vector, not the edges,
        # so no [E, H, C] tensor is built.
        if autocast_on(edge_attr.device.type):  # as GATConv: projected edges times att_edge
            return (self.lin_edge(edge_attr).view(-1, H, C) * self.att_edge).sum(-1)
        return edge_attr @ head_weights(self.att_edge, self.lin_edge.weight).t()

    # ---------------------------------------------------------------- forward
    def forward(self, x, edge_index, edge_attr: Optional[Tensor] = None, size=None,
                return_attention_weights: Optional[bool] = None):
        H, C = self.heads, self.out_channels
        x_src, x_dst, same = self._split_x(x)
        want_alpha = return_attention_weights is not None and bool(return_attention_weights)
        self._check_edge_order(edge_index, edge_attr, want_alpha)
        lin_src = self.lin if self.lin is not None else self.lin_src
        lin_dst = self.lin if self.lin is not None else self.lin_dst
        for lin, inp, name in ((lin_src, x_src, "x_src"), (lin_dst, x_dst, "x_dst"), (self.res, x_dst, "x_dst")):
            materialize(lin, inp, "x" if same else name)
        res = project(self.res, x_dst) if (self.res is not None and x_dst is not None) else None
        h_src = project(lin_src, x_src).view(-1, H, C)
        if (same and self.lin is not None and not want_alpha and not self._explaining()
                and gat_self_runs(x_src.device.type)):
            # One op call: the logit halves <h, att> (as PyG computes them, also under
            # autocast: h in float32 times float32 att), the phantom row of removed self
            # loops and the attention vectors' gradients are computed inside it.
            num_src, num_dst = self._sizes(x_src, x_dst, edge_index, size)
            prepared = self._prepare(edge_index, num_src, num_dst)
            out = gat_self_attention(h_src, self.att_src, self.att_dst, prepared.graph,
                                     self.negative_slope, self._edge_logits(prepared, edge_attr),
                                     self.dropout, self.training)
            return self._head(out, res)
        # The attention halves <a, W x> per head. From x as x . (W_head^T a_head): one skinny
        # GEMM [N, F] x [F, 2H], no [N, H, C] temporary - cheaper while x is narrower than h.
        # From h (sum over C of h * a) when x is wider than h (Cora: F = 1433 against
        # H*C = 64), so the wide input is not read a second time (nor in backward). Without
        # x_dst, att_dst and lin_dst take no part (their gradients stay None, as in GATConv).
        # Under autocast the logits are computed as PyG computes them there (low-precision h
        # times float32 att, summed in float32): from h, and from a projected h_dst; the same
        # numbers as GATConv up to the order of a C-term sum, whichever side of LeakyReLU's
        # kink a logit falls.
        autocast = autocast_on(x_src.device.type)
        if autocast or self._scores_from_h(same, x_src, H, C):
            score_src = (h_src * self.att_src).sum(-1)
            h_dst = h_src if same else (project(lin_dst, x_dst).view(-1, H, C) if x_dst is not None else None)
            score_dst = None if h_dst is None else (h_dst * self.att_dst).sum(-1)
        else:
            w_src = head_weights(self.att_src, lin_src.weight)
            if x_dst is None:
                score_src, score_dst = x_src @ w_src.t(), None
            else:
                # two skinny GEMMs: no cat of the weights, no slices and contiguous copies
                # of the scores (fewer op calls, forward and backward)
                w_dst = head_weights(self.att_dst, lin_dst.weight)
                score_src, score_dst = x_src @ w_src.t(), x_dst @ w_dst.t()

        num_src, num_dst = self._sizes(x_src, x_dst, edge_index, size)
        prepared = self._prepare(edge_index, num_src, num_dst)
        graph = prepared.graph

        if score_dst is None:
            score_dst = h_src.new_zeros(num_dst, H)
        if prepared.add_loops:  # the phantom row that absorbs removed self loops
            score_dst = torch.cat([score_dst, score_dst.new_zeros(1, H)], dim=0)

        edge_logits = self._edge_logits(prepared, edge_attr)

        if self._explaining():
            alpha = attention_weights(score_src, score_dst, graph, self.negative_slope, edge_logits,
                                      *dropout_and_seed(self.dropout, self.training, None))
            out = self._explain_aggregate(h_src, alpha[prepared.kept_edges()], prepared, num_src, num_dst)
        else:
            result = sparse_graph_attention(
                h_src, score_src, score_dst, graph, self.negative_slope, edge_logits,
                self.dropout, self.training, return_attention=want_alpha)
            out, alpha = result if want_alpha else (result, None)
            if prepared.add_loops:
                out = out[:num_dst]
        out = self._head(out, res)
        if not want_alpha:
            return out
        return self._with_attention(out, alpha, prepared, edge_index, num_src, num_dst)
