"""The attention variants as the shared tests see them: one adapter per variant that
builds its inputs, calls its op (public and raw) and its float64 reference, so a test
of a property every variant has is written once and parametrized over VARIANTS.

Each variant's inputs are four tensors, the last the optional per-edge one:
    gat          h [N_src, H, C], score_src [N_src, H], score_dst [N_dst, H], edge_logits [E, H]
    gatv2        x_l [N_src, H, C], x_r [N_dst, H, C], att [H, C], edge_feat [E, H, C]
    transformer  q [N_dst, H, C], k [N_src, H, C], v [N_src, H, C], edge_feat [E, H, C]
    transformer_edge  q [N_dst, H, C], kv [N_src, 2, H, C], w_edge [H, C, D], edge_attr [E, D]
                 (the transformer with its edge features W_e a_e projected inside; D = 3)
and one float parameter (GAT's and GATv2's negative_slope, the transformer's scale).
"""
from dataclasses import dataclass
from typing import Callable, Tuple

import pytest
import torch

import neptune_ext
from neptune_ext import Graph, ops
from neptune_ext.attention.reference import (gatv2_attention_reference, sparse_graph_attention_reference,
                                   transformer_attention_reference)
from neptune_ext.attention.transformer import projected_edges


@dataclass(frozen=True)
class Variant:
    name: str
    op: str                     # torch.ops.neptune.<op>_forward / <op>_backward
    arg_names: Tuple[str, ...]  # the public op's keyword names of the four inputs
    param_name: str             # the public op's keyword name of the parameter
    param: float                # a non-default parameter (gradcheck, opcheck, raw-op calls)
    # shapes(n_src, n_dst, E, H, C) -> the four input shapes
    shapes: Callable
    # public(*ins, graph, param, dropout, training, return_attention, seed)
    public: Callable
    # reference(*ins, src, dst, num_dst, param, dropout, seed, return_attention)
    reference_fn: Callable
    random_param: Callable      # a random valid parameter
    # atol of the float64 gradient checks on the small graphs (the hub's is 10x): GAT's
    # gradients sum fewer, smaller terms than GATv2's att and the transformer's q/k
    grad_atol: float
    # whether the op takes fewer destination rows than the graph has (GATConv's phantom row:
    # the rows beyond give no output and no gradient)
    fewer_rows: bool = False
    src_inputs: Tuple[int, ...] = ()  # which of the inputs have a row per source node
    dst_inputs: Tuple[int, ...] = ()  # ... per destination node

    def __str__(self):
        return self.name

    def inputs(self, n_src, n_dst, n_edges, H, C, dtype=torch.float64, device="cpu", scale=1.0,
               edge=True, requires_grad=True):
        """Random inputs, drawn in float64 and rounded to dtype; edge=False: no edge input."""
        def r(shape):
            return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype) \
                .requires_grad_(requires_grad)
        shapes = self.shapes(n_src, n_dst, n_edges, H, C)
        return tuple(r(s) for s in shapes[:3]) + ((r(shapes[3]) if edge else None),)

    def __call__(self, ins, graph, param=None, dropout=0.0, training=False, seed=None,
                 return_attention=False):
        """The public op; param None: the op's default."""
        kw = {} if param is None else {self.param_name: param}
        return self.public(*ins[:3], graph, edge=ins[3], dropout=dropout, training=training,
                           return_attention=return_attention, seed=seed, **kw)

    def reference(self, ins, graph, param=None, dropout=0.0, seed=None, return_attention=False):
        """The float64 reference (any dtype in, that dtype's arithmetic)."""
        if param is None:
            param = ins[0].shape[2] ** -0.5 if self.name.startswith("transformer") else 0.2
        return self.reference_fn(*ins[:3], graph.edge_index[0], graph.edge_index[1], graph.num_dst,
                                 param, ins[3], dropout, None if seed is None else int(seed),
                                 return_attention=return_attention)

    def kwargs(self, ins, graph):
        """The public op's keyword arguments for ins (edge input included)."""
        return dict(zip(self.arg_names, ins), graph=graph)

    def compiled(self):
        """Whether the raw ops torch.ops.neptune.<op>_forward/_backward are registered."""
        return neptune_ext._ext._C is not None and hasattr(torch.ops.neptune, self.op + "_forward")

    def raw_forward(self, ins, g, param=None, p=0.0, seed=None):
        param = self.param if param is None else param
        return getattr(torch.ops.neptune, self.op + "_forward")(
            *ins[:3], g.rowptr, g.col, g.eid, *g.csc(), ins[3], param, p, seed)


def _gat(h, ss, sd, graph, edge=None, **kw):
    return ops.sparse_graph_attention(h, ss, sd, graph, edge_logits=edge, **kw)


def _gatv2(xl, xr, att, graph, edge=None, **kw):
    return ops.gatv2_attention(xl, xr, att, graph, edge_feat=edge, **kw)


def _transformer(q, k, v, graph, edge=None, **kw):
    return ops.transformer_attention(q, k, v, graph, edge_feat=edge, **kw)


def _transformer_edge(q, kv, w, graph, edge=None, **kw):
    return ops.transformer_edge_attention(q, kv, w, graph, edge_attr=edge, **kw)


def _transformer_edge_reference(q, kv, w, src, dst, rows, scale, edge, dropout, seed, return_attention=False):
    return transformer_attention_reference(q, kv[:, 0], kv[:, 1], src, dst, rows, scale,
                                           projected_edges(w, edge), dropout, seed, return_attention)


GAT = Variant(
    "gat", "gat", ("h", "score_src", "score_dst", "edge_logits"), "negative_slope", 0.1,
    lambda n_src, n_dst, E, H, C: ((n_src, H, C), (n_src, H), (n_dst, H), (E, H)),
    _gat, sparse_graph_attention_reference, lambda: float(torch.rand(())), 1e-12,
    src_inputs=(0, 1), dst_inputs=(2,))
GATV2 = Variant(
    "gatv2", "gatv2", ("x_l", "x_r", "att", "edge_feat"), "negative_slope", 0.1,
    lambda n_src, n_dst, E, H, C: ((n_src, H, C), (n_dst, H, C), (H, C), (E, H, C)),
    _gatv2, gatv2_attention_reference, lambda: float(torch.rand(())), 1e-11, fewer_rows=True,
    src_inputs=(0,), dst_inputs=(1,))
TRANSFORMER = Variant(
    "transformer", "transformer", ("q", "k", "v", "edge_feat"), "scale", 0.7,
    lambda n_src, n_dst, E, H, C: ((n_dst, H, C), (n_src, H, C), (n_src, H, C), (E, H, C)),
    _transformer, transformer_attention_reference, lambda: float(torch.rand(())) + 0.1, 1e-11,
    src_inputs=(1, 2), dst_inputs=(0,))

EDGE_DIM = 3
TRANSFORMER_EDGE = Variant(
    "transformer_edge", "transformer_edge", ("q", "kv", "w_edge", "edge_attr"), "scale", 0.7,
    lambda n_src, n_dst, E, H, C: ((n_dst, H, C), (n_src, 2, H, C), (H, C, EDGE_DIM), (E, EDGE_DIM)),
    _transformer_edge, _transformer_edge_reference, lambda: float(torch.rand(())) + 0.1, 1e-11,
    src_inputs=(1,), dst_inputs=(0,))

VARIANTS = [GAT, GATV2, TRANSFORMER, TRANSFORMER_EDGE]
variants = pytest.mark.parametrize("variant", VARIANTS, ids=str)
CUDA_VARIANTS = [GAT, GATV2, TRANSFORMER]  # those with CUDA kernels (the emulated tests' subjects)
cuda_variants = pytest.mark.parametrize("variant", CUDA_VARIANTS, ids=str)


def grads(out, inputs, grad_out):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


def as_int64(g: Graph) -> Graph:
    """The same graph with int64 indices (the kernels' second index type)."""
    if g.rowptr.dtype == torch.int64:
        return g
    out = Graph(g.rowptr.long(), g.col.long(), g.eid.long(), g.edge_index, g.num_src, g.num_dst)
    out._csc = tuple(t.long() for t in g.csc())
    return out


def with_index(g: Graph, index: str) -> Graph:
    """g with "int32" (as built) or "int64" indices."""
    if index == "int32":
        assert g.rowptr.dtype == torch.int32
        return g
    return as_int64(g)
