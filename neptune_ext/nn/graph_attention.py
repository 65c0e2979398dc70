"""GraphAttention: a drop-in replacement for ``torch_geometric.nn.GATConv``.

Same constructor, same ``forward``, same parameter names and shapes (a GATConv
``state_dict`` loads unchanged), same numbers. The attention and aggregation run
in the fused op (:func:`neptune_ext.ops.sparse_graph_attention`), so no per-edge
feature tensor is built; the CSR graph (and its transpose, for backward) is
cached while the same ``edge_index`` tensor is passed again.
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..graph import Graph, _is_compiling, check_node_ids
from ..ops.graph_attention import attention_weights, sparse_graph_attention

Tensor = torch.Tensor
_FILL_REDUCE = {"mean": "mean", "add": "sum", "sum": "sum", "min": "amin", "max": "amax", "mul": "prod"}


def _glorot(t: Optional[Tensor]):
    if t is not None:
        a = math.sqrt(6.0 / (t.size(-2) + t.size(-1)))
        with torch.no_grad():
            t.uniform_(-a, a)


class _PreparedGraph:
    """A Graph over the caller's edges with self loops handled the GATConv way.

    Existing self loops are not removed (that would give the graph a data-dependent
    size, which torch.compile cannot trace); they are *redirected* to a phantom
    destination row ``num_dst`` whose output is discarded, which removes them from
    every softmax and every gradient exactly. Then one loop i -> i is appended per
    node i < min(num_src, num_dst).
    """

    def __init__(self, edge_index: Tensor, num_src: int, num_dst: int, add_loops: bool):
        self.num_dst = num_dst
        self.add_loops = add_loops
        self.num_input_edges = edge_index.shape[1]
        ei = edge_index.to(torch.int64)
        if add_loops:
            n = min(num_src, num_dst)
            self.is_loop = ei[0] == ei[1]
            self.orig_dst = ei[1]
            dst = torch.where(self.is_loop, torch.full_like(ei[1], num_dst), ei[1])
            loops = torch.arange(n, device=ei.device, dtype=torch.int64)
            ei = torch.cat([torch.stack([ei[0], dst]), torch.stack([loops, loops])], dim=1)
            self.num_loops = n
            self.graph = Graph.from_edge_index(ei, (num_src, num_dst + 1), validate=False)
        else:
            self.is_loop = None
            self.num_loops = 0
            self.graph = Graph.from_edge_index(ei, (num_src, num_dst), validate=False)

    def edge_attr(self, edge_attr: Tensor, fill_value) -> Tensor:
        """Edge attributes for the prepared edges: the input ones plus the loop fill."""
        if not self.add_loops:
            return edge_attr
        n = self.num_loops
        if isinstance(fill_value, str):
            # Reduce the attributes of the (non-loop) edges entering each node; input
            # self loops go to the phantom slot num_dst and are dropped.
            reduce = _FILL_REDUCE[fill_value]
            dst = torch.where(self.is_loop, torch.full_like(self.orig_dst, self.num_dst), self.orig_dst)
            idx = dst.view(-1, *([1] * (edge_attr.dim() - 1))).expand_as(edge_attr)
            shape = (self.num_dst + 1,) + tuple(edge_attr.shape[1:])
            if reduce == "mean":
                total = edge_attr.new_zeros(shape).scatter_add(0, idx, edge_attr)
                count = edge_attr.new_zeros(self.num_dst + 1).index_add(
                    0, dst, torch.ones_like(dst, dtype=edge_attr.dtype))
                loop_attr = total / count.clamp(min=1).view(-1, *([1] * (edge_attr.dim() - 1)))
            else:
                loop_attr = edge_attr.new_zeros(shape).scatter_reduce(0, idx, edge_attr, reduce=reduce,
                                                                       include_self=False)
            loop_attr = loop_attr[:n]
        else:
            fill = fill_value if isinstance(fill_value, Tensor) else torch.tensor(fill_value)
            loop_attr = fill.to(edge_attr.dtype).to(edge_attr.device).expand(
                (n,) + tuple(edge_attr.shape[1:])).clone()
        return torch.cat([edge_attr, loop_attr], dim=0)

    def output_edge_index(self) -> Tensor:
        """The edge list of the returned attention weights (GATConv's order)."""
        ei = self.graph.edge_index
        if not self.add_loops:
            return ei
        return ei[:, self.kept_edges()]

    def kept_edges(self) -> Tensor:
        if not self.add_loops:
            return torch.ones(self.graph.num_edges, dtype=torch.bool, device=self.graph.device)
        return torch.cat([~self.is_loop, torch.ones(self.num_loops, dtype=torch.bool,
                                                    device=self.is_loop.device)])


class GraphAttention(nn.Module):
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
        super().__init__()
        if not isinstance(out_channels, int) or out_channels <= 0:
            raise ValueError(f"out_channels must be a positive int, got {out_channels!r}")
        if not isinstance(heads, int) or heads <= 0:
            raise ValueError(f"heads must be a positive int, got {heads!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if isinstance(fill_value, str) and fill_value not in _FILL_REDUCE:
            raise ValueError(f"fill_value must be a number, a tensor or one of {sorted(_FILL_REDUCE)}, "
                             f"got {fill_value!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.heads = heads
        self.concat = concat
        self.negative_slope = negative_slope
        self.dropout = dropout
        self.add_self_loops = add_self_loops
        self.edge_dim = edge_dim
        self.fill_value = fill_value
        self.residual = residual
        HC = heads * out_channels

        self.lin = self.lin_src = self.lin_dst = None
        if isinstance(in_channels, int):
            self.lin = nn.Linear(in_channels, HC, bias=False)
        else:
            self.lin_src = nn.Linear(in_channels[0], HC, bias=False)
            self.lin_dst = nn.Linear(in_channels[1], HC, bias=False)
        self.att_src = nn.Parameter(torch.empty(1, heads, out_channels))
        self.att_dst = nn.Parameter(torch.empty(1, heads, out_channels))
        if edge_dim is not None:
            self.lin_edge = nn.Linear(edge_dim, HC, bias=False)
            self.att_edge = nn.Parameter(torch.empty(1, heads, out_channels))
        else:
            self.lin_edge = None
            self.register_parameter("att_edge", None)
        total_out = out_channels * (heads if concat else 1)
        if residual:
            res_in = in_channels if isinstance(in_channels, int) else in_channels[1]
            self.res = nn.Linear(res_in, total_out, bias=False)
        else:
            self.register_parameter("res", None)
        if bias:
            self.bias = nn.Parameter(torch.empty(total_out))
        else:
            self.register_parameter("bias", None)
        self._graph_cache = None
        self.reset_parameters()

    def reset_parameters(self):
        for lin in (self.lin, self.lin_src, self.lin_dst, self.lin_edge, self.res):
            if lin is not None:
                _glorot(lin.weight)
        _glorot(self.att_src)
        _glorot(self.att_dst)
        _glorot(self.att_edge)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    # ------------------------------------------------------------------ graph
    def _prepare(self, edge_index, num_src: int, num_dst: int) -> _PreparedGraph:
        if isinstance(edge_index, Graph):
            if (edge_index.num_src, edge_index.num_dst) != (num_src, num_dst):
                raise ValueError(f"edge_index (a Graph) has (num_src, num_dst) = "
                                 f"({edge_index.num_src}, {edge_index.num_dst}), but the inputs give "
                                 f"({num_src}, {num_dst})")
            p = _PreparedGraph.__new__(_PreparedGraph)
            p.graph, p.add_loops, p.is_loop, p.num_loops = edge_index, False, None, 0
            p.num_dst, p.num_input_edges = num_dst, edge_index.num_edges
            return p
        if isinstance(edge_index, Tensor) and edge_index.layout != torch.strided:
            edge_index = _sparse_to_edge_index(edge_index)
        if not isinstance(edge_index, Tensor):
            raise ValueError("edge_index must be a [2, E] tensor, a neptune_ext.Graph or a torch "
                             f"sparse adjacency, got {type(edge_index).__name__}")
        compiling = _is_compiling()
        key = None
        if not compiling:
            if edge_index.is_floating_point() or edge_index.dim() != 2 or edge_index.shape[0] != 2:
                raise ValueError(f"edge_index must be an integer tensor of shape [2, E], got "
                                 f"{edge_index.dtype} {list(edge_index.shape)}")
            key = (edge_index.data_ptr(), edge_index._version, tuple(edge_index.shape),
                   edge_index.device, num_src, num_dst, self.add_self_loops)
            if self._graph_cache is not None and self._graph_cache[0] == key:
                return self._graph_cache[1]
            if edge_index.dtype == torch.bool or edge_index.is_complex():
                raise ValueError(f"edge_index must have an integer dtype, got {edge_index.dtype}")
            check_node_ids(edge_index, num_src, num_dst)
        prepared = _PreparedGraph(edge_index, num_src, num_dst, self.add_self_loops)
        if key is not None:
            self._graph_cache = (key, prepared)
        return prepared

    # ---------------------------------------------------------------- forward
    def forward(self, x, edge_index, edge_attr: Optional[Tensor] = None, size=None,
                return_attention_weights: Optional[bool] = None):
        H, C = self.heads, self.out_channels
        if isinstance(x, Tensor):
            x_src, x_dst = x, x
            same = True
        else:
            x_src, x_dst = x
            same = False
        if not isinstance(x_src, Tensor) or x_src.dim() != 2:
            raise ValueError(f"x must be a [N, F] tensor or a (x_src, x_dst) pair of them, got "
                             f"{getattr(x_src, 'shape', type(x_src).__name__)}")
        res = self.res(x_dst) if (self.res is not None and x_dst is not None) else None

        lin_src = self.lin if self.lin is not None else self.lin_src
        lin_dst = self.lin if self.lin is not None else self.lin_dst
        h_src = lin_src(x_src).view(-1, H, C)
        # The attention halves are computed from x, not from h:
        #   <a, W x>_head = x . (W_head^T a_head)
        # so one skinny GEMM [N, F] x [F, 2H] replaces two passes over h (and their
        # backward); no [N, H, C] temporary is created.
        w_src = torch.einsum("hc,hcf->hf", self.att_src[0], lin_src.weight.view(H, C, -1))
        w_dst = torch.einsum("hc,hcf->hf", self.att_dst[0], lin_dst.weight.view(H, C, -1))
        if same or x_dst is None:
            scores = x_src @ torch.cat([w_src, w_dst]).t()
            score_src = scores[:, :H]
            score_dst = scores[:, H:] if x_dst is not None else None
        else:
            score_src = x_src @ w_src.t()
            score_dst = x_dst @ w_dst.t()

        num_src = x_src.shape[0]
        if size is not None:
            num_src, num_dst = (size[0] if size[0] is not None else num_src), size[1]
        else:
            num_dst = None
        if num_dst is None:
            if x_dst is not None:
                num_dst = x_dst.shape[0]
            elif isinstance(edge_index, Graph):
                num_dst = edge_index.num_dst
            else:
                num_dst = num_src
        prepared = self._prepare(edge_index, num_src, num_dst)
        graph = prepared.graph

        if score_dst is None:
            score_dst = h_src.new_zeros(num_dst, H)
        if prepared.add_loops:  # the phantom row that absorbs removed self loops
            score_dst = torch.cat([score_dst, score_dst.new_zeros(1, H)], dim=0)

        edge_logits = None
        if edge_attr is not None and self.lin_edge is not None:
            if edge_attr.dim() == 1:
                edge_attr = edge_attr.view(-1, 1)
            edge_attr = prepared.edge_attr(edge_attr, self.fill_value)
            # a_e^T W_e e = (W_e^T a_e)^T e: project the attention vector, not the edges,
            # so no [E, H, C] tensor is built.
            w_att = torch.einsum("hc,hcd->hd", self.att_edge[0],
                                 self.lin_edge.weight.view(H, C, -1))
            edge_logits = edge_attr @ w_att.t()

        want_alpha = return_attention_weights is not None and bool(return_attention_weights)
        result = sparse_graph_attention(
            h_src, score_src, score_dst, graph, self.negative_slope, edge_logits,
            self.dropout, self.training, return_attention=want_alpha)
        out, alpha = result if want_alpha else (result, None)
        if prepared.add_loops:
            out = out[:num_dst]

        out = out.reshape(-1, H * C) if self.concat else out.mean(dim=1)
        if res is not None:
            out = out + res
        if self.bias is not None:
            out = out + self.bias
        if not want_alpha:
            return out
        keep = prepared.kept_edges()
        alpha = alpha[keep]
        ei_out = prepared.output_edge_index()
        if isinstance(edge_index, Tensor) and edge_index.layout != torch.strided:
            adj = torch.sparse_coo_tensor(torch.stack([ei_out[1], ei_out[0]]), alpha,
                                          (num_dst, num_src, H))
            return out, (adj, alpha)
        return out, (ei_out, alpha)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, heads={self.heads})"


def _sparse_to_edge_index(adj: Tensor) -> Tensor:
    """A torch sparse adjacency [N_dst, N_src] (adj[i, j] != 0: edge j -> i) to COO [2, E]."""
    if adj.layout == torch.sparse_coo:
        idx = adj.coalesce().indices()
        return torch.stack([idx[1], idx[0]])
    if adj.layout == torch.sparse_csr:
        crow, col = adj.crow_indices(), adj.col_indices()
        row = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device),
                                      crow[1:] - crow[:-1])
        return torch.stack([col.to(torch.int64), row])
    raise ValueError(f"edge_index: unsupported sparse layout {adj.layout} (use COO or CSR)")
