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

from .._util import is_compiling as _is_compiling
from ..graph import _FILL_REDUCE, GATGraph, Graph, _parse_size, sparse_to_edge_index
from ..ops.graph_attention import check_slope, sparse_graph_attention

Tensor = torch.Tensor


def _linear(in_features: int, out_features: int, name: str) -> nn.Module:
    """A bias-free Linear; ``in_features=-1`` makes it lazy (sized on first use, as in PyG)."""
    if in_features == -1:
        return nn.LazyLinear(out_features, bias=False)
    if not isinstance(in_features, int) or isinstance(in_features, bool) or in_features <= 0:
        raise ValueError(f"{name} must be a positive int or -1 (lazy), got {in_features!r}")
    return nn.Linear(in_features, out_features, bias=False)


def _is_lazy(lin: nn.Module) -> bool:
    return isinstance(lin, nn.modules.lazy.LazyModuleMixin) and lin.has_uninitialized_params()


def _materialize(lin: Optional[nn.Module], x: Optional[Tensor]) -> None:
    """Size a lazy Linear from its input (glorot-initialized, as PyG does)."""
    if lin is not None and x is not None and _is_lazy(lin):
        lin(x[:0])
        _glorot(lin.weight)


def _glorot(t: Optional[Tensor]):
    if t is not None:
        a = math.sqrt(6.0 / (t.size(-2) + t.size(-1)))
        with torch.no_grad():
            t.uniform_(-a, a)


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
        super().__init__()
        if not isinstance(out_channels, int) or out_channels <= 0:
            raise ValueError(f"out_channels must be a positive int, got {out_channels!r}")
        if not isinstance(heads, int) or heads <= 0:
            raise ValueError(f"heads must be a positive int, got {heads!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        check_slope(negative_slope)
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
            self.lin = _linear(in_channels, HC, "in_channels")
        else:
            if not (isinstance(in_channels, (tuple, list)) and len(in_channels) == 2):
                raise ValueError(f"in_channels must be an int or a (src, dst) pair, got {in_channels!r}")
            self.lin_src = _linear(in_channels[0], HC, "in_channels[0]")
            self.lin_dst = _linear(in_channels[1], HC, "in_channels[1]")
        self.att_src = nn.Parameter(torch.empty(1, heads, out_channels))
        self.att_dst = nn.Parameter(torch.empty(1, heads, out_channels))
        if edge_dim is not None:
            self.lin_edge = _linear(edge_dim, HC, "edge_dim")
            self.att_edge = nn.Parameter(torch.empty(1, heads, out_channels))
        else:
            self.lin_edge = None
            self.register_parameter("att_edge", None)
        total_out = out_channels * (heads if concat else 1)
        if residual:
            res_in = in_channels if isinstance(in_channels, int) else in_channels[1]
            self.res = _linear(res_in, total_out, "in_channels")
        else:
            self.register_parameter("res", None)
        if bias:
            self.bias = nn.Parameter(torch.empty(total_out))
        else:
            self.register_parameter("bias", None)
        self.cache_graph = True
        self._graph_cache = None
        self.reset_parameters()

    def reset_parameters(self):
        for lin in (self.lin, self.lin_src, self.lin_dst, self.lin_edge, self.res):
            if lin is not None and not _is_lazy(lin):
                _glorot(lin.weight)
        _glorot(self.att_src)
        _glorot(self.att_dst)
        _glorot(self.att_edge)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    # ------------------------------------------------------------------ graph
    def _prepare(self, edge_index, num_src: int, num_dst: int) -> GATGraph:
        """The kernels' graph for ``edge_index``, cached while the same tensor comes again.

        The cache holds the caller's tensor and hits only for that very tensor object,
        unchanged in shape, strides, offset, dtype, device and version counter, with the
        same sizes and self-loop setting. It cannot see writes that bypass the version
        counter (through ``.data``, ``.numpy()`` or DLPack): after such a write call
        :meth:`clear_graph_cache`, or set ``cache_graph = False`` to build every call.
        """
        if isinstance(edge_index, Graph):
            if (edge_index.num_src, edge_index.num_dst) != (num_src, num_dst):
                raise ValueError(f"edge_index (a Graph) has (num_src, num_dst) = "
                                 f"({edge_index.num_src}, {edge_index.num_dst}), but the inputs give "
                                 f"({num_src}, {num_dst})")
            return GATGraph(edge_index, num_dst)
        if isinstance(edge_index, Tensor) and edge_index.layout != torch.strided:
            return GATGraph.from_edge_index(sparse_to_edge_index(edge_index), num_src, num_dst,
                                            self.add_self_loops)
        if not isinstance(edge_index, Tensor):
            raise ValueError("edge_index must be a [2, E] tensor, a neptune_ext.Graph or a torch "
                             f"sparse adjacency, got {type(edge_index).__name__}")
        key = None
        if self.cache_graph and not _is_compiling() and not edge_index.is_inference():
            key = (edge_index.dtype, edge_index.device, tuple(edge_index.shape), edge_index.stride(),
                   edge_index.storage_offset(), edge_index.data_ptr(), edge_index._version,
                   num_src, num_dst, self.add_self_loops)
            cached = self._graph_cache
            if cached is not None and cached[0] is edge_index and cached[1] == key:
                return cached[2]
        prepared = GATGraph.from_edge_index(edge_index, num_src, num_dst, self.add_self_loops)
        self._graph_cache = (edge_index, key, prepared) if key is not None else None
        return prepared

    scores_from = "auto"  # "auto" | "x" | "h": where the attention halves are computed from

    def _scores_from_h(self, same: bool, x: Tensor, H: int, C: int) -> bool:
        if not same or self.lin is None:  # h_dst would cost a second projection
            return False
        if self.scores_from != "auto":
            return self.scores_from == "h"
        return x.shape[1] > H * C

    def clear_graph_cache(self) -> None:
        """Forget the cached graph (see :meth:`_prepare`)."""
        self._graph_cache = None

    # ---------------------------------------------------------------- forward
    def forward(self, x, edge_index, edge_attr: Optional[Tensor] = None, size=None,
                return_attention_weights: Optional[bool] = None):
        H, C = self.heads, self.out_channels
        same = isinstance(x, Tensor)
        if same:
            x_src = x_dst = x
        elif isinstance(x, (tuple, list)) and len(x) == 2:
            x_src, x_dst = x
        else:
            raise ValueError(f"x must be a [N, F] tensor or a (x_src, x_dst) pair, got {type(x).__name__}")
        if not isinstance(x_src, Tensor) or x_src.dim() != 2:
            raise ValueError(f"x must be a [N, F] tensor or a (x_src, x_dst) pair of them; x_src is "
                             f"{list(x_src.shape) if isinstance(x_src, Tensor) else type(x_src).__name__}")
        if x_dst is not None and (not isinstance(x_dst, Tensor) or x_dst.dim() != 2):
            raise ValueError(f"x must be a [N, F] tensor or a (x_src, x_dst) pair of them; x_dst "
                             "(destination features) must be a [N_dst, F] tensor or None, got "
                             f"{list(x_dst.shape) if isinstance(x_dst, Tensor) else type(x_dst).__name__}")
        lin_src = self.lin if self.lin is not None else self.lin_src
        lin_dst = self.lin if self.lin is not None else self.lin_dst
        for lin, inp in ((lin_src, x_src), (lin_dst, x_dst), (self.res, x_dst)):
            _materialize(lin, inp)
        res = self.res(x_dst) if (self.res is not None and x_dst is not None) else None
        h_src = lin_src(x_src).view(-1, H, C)
        # The attention halves <a, W x> per head. From x as x . (W_head^T a_head): one skinny
        # GEMM [N, F] x [F, 2H], no [N, H, C] temporary - cheaper while x is narrower than h.
        # From h (sum over C of h * a) when x is wider than h (Cora: F = 1433 against
        # H*C = 64), so the wide input is not read a second time (nor in backward). Without
        # x_dst, att_dst and lin_dst take no part (their gradients stay None, as in GATConv).
        if self._scores_from_h(same, x_src, H, C):
            score_src = (h_src * self.att_src).sum(-1)
            score_dst = (h_src * self.att_dst).sum(-1)
        else:
            w_src = torch.einsum("hc,hcf->hf", self.att_src[0], lin_src.weight.view(H, C, -1))
            if x_dst is None:
                score_src, score_dst = x_src @ w_src.t(), None
            else:
                w_dst = torch.einsum("hc,hcf->hf", self.att_dst[0], lin_dst.weight.view(H, C, -1))
                if same:
                    scores = x_src @ torch.cat([w_src, w_dst]).t()
                    score_src, score_dst = scores[:, :H], scores[:, H:]
                else:
                    score_src, score_dst = x_src @ w_src.t(), x_dst @ w_dst.t()

        num_src, num_dst = x_src.shape[0], None
        if size is not None:
            if not (isinstance(size, (tuple, list)) and len(size) == 2):
                raise ValueError(f"size must be None or a (num_src, num_dst) pair, got {size!r}")
            size_src, num_dst = _parse_size(size)
            if size_src is not None and size_src != num_src:
                raise ValueError(f"size[0] = {size_src} but x_src has {num_src} nodes")
        if num_dst is None:
            if x_dst is not None:
                num_dst = x_dst.shape[0]
            elif isinstance(edge_index, Graph):
                num_dst = edge_index.num_dst
            else:
                num_dst = num_src
        if x_dst is not None and x_dst.shape[0] != num_dst:
            raise ValueError(f"x_dst has {x_dst.shape[0]} nodes but size gives num_dst = {num_dst}")
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
            _materialize(self.lin_edge, edge_attr)
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
        alpha = alpha[prepared.kept_edges()]
        ei_out = prepared.output_edge_index()
        if isinstance(edge_index, Tensor) and edge_index.layout != torch.strided:
            adj = torch.sparse_coo_tensor(torch.stack([ei_out[1], ei_out[0]]), alpha,
                                          (num_dst, num_src, H))
            return out, (adj, alpha)
        return out, (ei_out, alpha)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, heads={self.heads})"
