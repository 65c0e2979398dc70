"""GraphAttentionV2: a drop-in replacement for ``torch_geometric.nn.GATv2Conv``.

Same constructor, same ``forward``, same parameter names and shapes (state_dicts load
both ways), same numbers. Attention and aggregation run in the fused GATv2 op
(:func:`neptune_ext.ops.gatv2_attention`): the per-edge [E, H, C] tensors GATv2Conv
builds (x_i + x_j, its LeakyReLU, the messages) are never materialized.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from .gatv2 import gatv2_attention, gatv2_attention_weights
from .spec import dropout_and_seed
from .layer import AttentionBase, glorot, linear, materialize, reset_linear
from .projection import project, project_stack

Tensor = torch.Tensor


class GraphAttentionV2(AttentionBase):
    r"""GATv2 layer (dynamic attention, Brody et al. 2022), a drop-in for
    ``torch_geometric.nn.GATv2Conv``.

    .. math::
        x'_i = \sum_{j \in N(i) \cup \{i\}} \alpha_{ij} W_l x_j,\qquad
        \alpha_{ij} = \mathrm{softmax}_j\big(a^\top \mathrm{LeakyReLU}(W_l x_j + W_r x_i
        (+ W_e e_{ij}))\big)

    Args mirror GATv2Conv: ``in_channels`` (int, or ``(src, dst)``; ``-1`` is lazy),
    ``out_channels``, ``heads``, ``concat``, ``negative_slope``, ``dropout`` (on the
    attention weights, inside the fused kernel), ``add_self_loops``, ``edge_dim``,
    ``fill_value``, ``bias`` (of the output and of ``lin_l``/``lin_r``, as in PyG),
    ``share_weights`` (``lin_r`` is ``lin_l``), ``residual``.

    ``forward(x, edge_index, edge_attr=None, return_attention_weights=None, size=None)``
    takes the inputs GATv2Conv takes (``x`` a tensor or a ``(x_src, x_dst)`` pair;
    ``edge_index`` a COO ``[2, E]`` tensor, PyG's ``EdgeIndex``, a torch sparse
    adjacency, or a :class:`neptune_ext.Graph` used as is). The graph is cached like
    :class:`GraphAttention`'s.

    Example::

        >>> conv = GraphAttentionV2((16, 12), 8, heads=4, add_self_loops=False)  # bipartite
        >>> x_src, x_dst = torch.randn(10, 16), torch.randn(6, 12)
        >>> edge_index = torch.stack([torch.randint(0, 10, (40,)), torch.randint(0, 6, (40,))])
        >>> conv((x_src, x_dst), edge_index).shape
        torch.Size([6, 32])
    """

    def __init__(self, in_channels: Union[int, Tuple[int, int]], out_channels: int, heads: int = 1,
                 concat: bool = True, negative_slope: float = 0.2, dropout: float = 0.0,
                 add_self_loops: bool = True, edge_dim: Optional[int] = None,
                 fill_value: Union[float, Tensor, str] = "mean", bias: bool = True,
                 share_weights: bool = False, residual: bool = False):
        super().__init__(in_channels, out_channels, heads, concat, negative_slope, dropout,
                         add_self_loops, edge_dim, fill_value, residual)
        self.share_weights = share_weights
        HC = heads * out_channels
        pair = not isinstance(in_channels, int)
        self.lin_l = linear(in_channels[0] if pair else in_channels, HC,
                            "in_channels[0]" if pair else "in_channels", bias=bias)
        if share_weights:
            self.lin_r = self.lin_l
        else:
            self.lin_r = linear(in_channels[1] if pair else in_channels, HC,
                                "in_channels[1]" if pair else "in_channels", bias=bias)
        self.att = nn.Parameter(torch.empty(1, heads, out_channels))
        self.lin_edge = linear(edge_dim, HC, "edge_dim") if edge_dim is not None else None
        self._residual_and_bias(bias)
        self.reset_parameters()

    def reset_parameters(self):
        for lin in (self.lin_l, self.lin_r, self.lin_edge, self.res):
            reset_linear(lin)
        glorot(self.att)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x, edge_index, edge_attr: Optional[Tensor] = None,
                return_attention_weights: Optional[bool] = None, size=None):
        H, C = self.heads, self.out_channels
        x_src, x_dst, same = self._split_x(x)
        want_alpha = return_attention_weights is not None and bool(return_attention_weights)
        self._check_edge_order(edge_index, edge_attr, want_alpha)
        if x_dst is None:
            raise ValueError("x: GraphAttentionV2 needs destination features (x_dst is None); "
                             "pass x as a tensor or a (x_src, x_dst) pair of tensors")
        for lin, inp, name in ((self.lin_l, x_src, "x_src"), (self.lin_r, x_dst, "x_dst"),
                               (self.res, x_dst, "x_dst")):
            materialize(lin, inp, "x" if same else name)
        res = project(self.res, x_dst) if self.res is not None else None
        # [N, H * C] as the Linear layers return them: the op reads the heads from att
        if same and not self.share_weights:
            x_l, x_r = project_stack((self.lin_l, self.lin_r), x_src)  # one GEMM where it can
        else:
            x_l = project(self.lin_l, x_src)
            x_r = x_l if (same and self.share_weights) else project(self.lin_r, x_dst)

        num_src, num_dst = self._sizes(x_src, x_dst, edge_index, size)
        prepared = self._prepare(edge_index, num_src, num_dst)
        graph = prepared.graph

        edge_feat = self._edge_features(prepared, edge_attr)

        if self._explaining():
            alpha = gatv2_attention_weights(x_l, x_r, self.att, graph, self.negative_slope, edge_feat,
                                            *dropout_and_seed(self.dropout, self.training, None))
            out = self._explain_aggregate(x_l.view(-1, H, C), alpha[prepared.kept_edges()], prepared,
                                          num_src, num_dst)
        else:
            result = gatv2_attention(x_l, x_r, self.att, graph, self.negative_slope, edge_feat,
                                     self.dropout, self.training, return_attention=want_alpha)
            out, alpha = result if want_alpha else (result, None)
        out = self._head(out, res)
        if not want_alpha:
            return out
        return self._with_attention(out, alpha, prepared, edge_index, num_src, num_dst)
