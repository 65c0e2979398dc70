"""GATConv's self loops, owned by the GAT layers (GraphAttention, GraphAttentionV2).

``add_self_loops=True`` in PyG's GATConv/GATv2Conv means: remove the graph's self loops, then
add one loop per node, with edge attributes completed by ``fill_value``. :class:`GATGraph`
does that without a data-dependent size (which torch.compile cannot trace): the builder
``neptune::build_csr(..., replace_self_loops=True)`` moves existing loops to an extra
trailing destination row whose output the layer never reads, and appends the new loops.
The :class:`~neptune_ext.graph.Graph` it produces is an ordinary graph of ``num_dst + 1``
rows; this module knows what the extra row means.
"""
from typing import Optional

import torch

from ..graph import Graph, _check_edge_index, _index_dtype, _use_graph_ops, check_node_ids
from .._util import is_compiling as _is_compiling

# fill_value names -> torch reductions (GATConv's fill_value for the added loops' attributes).
FILL_REDUCE = {"mean": "mean", "add": "sum", "sum": "sum", "min": "amin", "max": "amax", "mul": "prod"}


class GATGraph:
    """A graph with self loops handled the way ``GATConv(add_self_loops=True)`` does.

    Existing self loops are not removed (that would give the graph a data-dependent
    size, which torch.compile cannot trace); they are *redirected* to a phantom
    destination row ``num_dst`` whose output is discarded, which removes them from
    every softmax and every gradient exactly. Then one loop i -> i is appended per
    node i < min(num_src, num_dst). ``graph`` is the kernels' Graph (``num_dst + 1``
    destination rows); :meth:`edge_attr` completes edge attributes with the loops'
    ``fill_value``; :meth:`kept_edges` / :meth:`output_edge_index` give the edges of
    the returned attention weights in GATConv's order.

    Without loops (``add_loops=False``, or a ready :class:`Graph`), it wraps the graph
    as is.
    """

    def __init__(self, graph: Graph, num_dst: int, input_edges: Optional[torch.Tensor] = None,
                 num_loops: int = 0):
        self.graph = graph
        self.num_dst = num_dst
        self.add_loops = input_edges is not None
        self._input_edges = input_edges  # the caller's [2, E] edges (int64), with loops only
        self._is_loop = None
        self.num_loops = num_loops

    @property
    def is_loop(self) -> Optional[torch.Tensor]:
        """[E] which input edges are self loops (computed on first use: a training step that
        wants neither attention weights nor edge attributes never pays for it)."""
        if self._is_loop is None and self.add_loops:
            self._is_loop = self._input_edges[0] == self._input_edges[1]
        return self._is_loop

    @classmethod
    def from_edge_index(cls, edge_index: torch.Tensor, num_src: int, num_dst: int,
                        add_loops: bool) -> "GATGraph":
        ei = _check_edge_index(edge_index)
        if not add_loops:
            return cls(Graph._build(ei, num_src, num_dst), num_dst)
        n = min(num_src, num_dst)
        ei = ei.to(torch.int64)

        def prepared_edge_index():
            dst = torch.where(ei[0] == ei[1], torch.full_like(ei[1], num_dst), ei[1])
            loops = torch.arange(n, device=ei.device, dtype=torch.int64)
            return torch.cat([torch.stack([ei[0], dst]), torch.stack([loops, loops])], dim=1)

        if _use_graph_ops(ei.device):
            itype = _index_dtype(ei.shape[1] + n, max(num_src, num_dst + 1))
            rowptr, col, eid = torch.ops.neptune.build_csr(ei, num_src, num_dst, itype, True)
            graph = Graph(rowptr, col, eid, prepared_edge_index, num_src, num_dst + 1)
        else:
            if not _is_compiling():
                check_node_ids(ei, num_src, num_dst)
            graph = Graph._build(prepared_edge_index(), num_src, num_dst + 1)
        return cls(graph, num_dst, ei, n)

    @property
    def num_input_edges(self) -> int:
        """The number of the caller's edges (before the added self loops)."""
        return self._input_edges.shape[1] if self.add_loops else self.graph.num_edges

    def edge_attr(self, edge_attr: torch.Tensor, fill_value) -> torch.Tensor:
        """Edge attributes for the prepared edges: the input ones plus the loop fill."""
        if not self.add_loops:
            return edge_attr
        n = self.num_loops
        if isinstance(fill_value, str):
            # Reduce the attributes of the (non-loop) edges entering each node; input
            # self loops go to the phantom slot num_dst and are dropped.
            reduce = FILL_REDUCE[fill_value]
            dst = self.graph.edge_index[1, :self.num_input_edges]  # input edges, loops -> num_dst
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
            fill = fill_value if isinstance(fill_value, torch.Tensor) else torch.tensor(fill_value)
            loop_attr = fill.to(edge_attr.dtype).to(edge_attr.device).expand(
                (n,) + tuple(edge_attr.shape[1:])).clone()
        return torch.cat([edge_attr, loop_attr], dim=0)

    def kept_edges(self) -> torch.Tensor:
        if not self.add_loops:
            return torch.ones(self.graph.num_edges, dtype=torch.bool, device=self.graph.device)
        return torch.cat([~self.is_loop, torch.ones(self.num_loops, dtype=torch.bool,
                                                    device=self.is_loop.device)])

    def output_edge_index(self) -> torch.Tensor:
        """The edge list of the returned attention weights (GATConv's order)."""
        ei = self.graph.edge_index
        return ei[:, self.kept_edges()] if self.add_loops else ei
