"""What GraphAttention (GATConv) and GraphAttentionV2 (GATv2Conv) share: the base class
PyG's tools recognize, input parsing, the cached kernel graph, the output head, and the
exact message-passing path PyG's explainers need.

When PyG is installed the layers are ``torch_geometric.nn.MessagePassing`` subclasses, so
``to_hetero`` groups their outputs by destination node type and ``torch_geometric.explain``
can mask their messages; ``import neptune_ext`` works without PyG (the base is then
``nn.Module``).
"""
import importlib.util
import math
import warnings
from typing import Optional, Tuple

import torch
import torch.nn as nn

from .._util import is_compiling as _is_compiling
from ..graph import Graph, _parse_size, sparse_to_edge_index
from .self_loops import FILL_REDUCE, GATGraph
from .gat import check_slope

Tensor = torch.Tensor


def _pyg_message_passing():
    if importlib.util.find_spec("torch_geometric") is None:
        return None
    try:
        with warnings.catch_warnings():  # PyG's own deprecation notices on import
            warnings.simplefilter("ignore")
            from torch_geometric.nn.conv import MessagePassing
        return MessagePassing
    except Exception:  # a broken PyG install must not break neptune_ext
        return None


MessagePassing = _pyg_message_passing()
HAS_PYG = MessagePassing is not None
_Base = MessagePassing if HAS_PYG else nn.Module
# MessagePassing's hooks that its propagate runs (torch_geometric.nn.conv.message_passing)
_PROPAGATE_HOOKS = ("_propagate_forward_pre_hooks", "_propagate_forward_hooks",
                    "_message_forward_pre_hooks", "_message_forward_hooks",
                    "_aggregate_forward_pre_hooks", "_aggregate_forward_hooks",
                    "_message_and_aggregate_forward_pre_hooks",
                    "_message_and_aggregate_forward_hooks")


def _is_edge_index(t) -> bool:
    """PyG's EdgeIndex (a Tensor subclass holding its plain [2, E] data)."""
    return isinstance(t, Tensor) and type(t) is not Tensor and hasattr(t, "as_tensor") \
        and hasattr(t, "sparse_size")


def linear(in_features: int, out_features: int, name: str, bias: bool = False) -> nn.Module:
    """A Linear; ``in_features=-1`` makes it lazy (sized on first use, as in PyG)."""
    if in_features == -1:
        return nn.LazyLinear(out_features, bias=bias)
    if not isinstance(in_features, int) or isinstance(in_features, bool) or in_features <= 0:
        raise ValueError(f"{name} must be a positive int or -1 (lazy), got {in_features!r}")
    return nn.Linear(in_features, out_features, bias=bias)


def is_lazy(lin: nn.Module) -> bool:
    return isinstance(lin, nn.modules.lazy.LazyModuleMixin) and lin.has_uninitialized_params()


def materialize(lin: Optional[nn.Module], x: Optional[Tensor], name: str = "x",
                glorot_init: bool = True) -> None:
    """Size a lazy Linear from its input (a glorot-initialized weight, as PyG's GAT layers
    do; ``glorot_init=False``: torch's Linear initialization, as PyG's default Linear), and
    check the input's width against it."""
    if lin is None or x is None:
        return
    if is_lazy(lin):
        lin(x[:0])
        if glorot_init:
            glorot(lin.weight)
        if autocast_on(x.device.type):  # autocast cached a cast of the weight before glorot
            torch.clear_autocast_cache()
    # in_features (also on modules whose weight is not a [out, in] tensor: a dynamically
    # quantized or a packed 4-bit Linear; and reading a parametrized weight would run its
    # parametrization). Where it is 0, a lazy Linear given a state dict before its first call
    # (torch leaves in_features at 0 and runs it): the loaded weight's, kept.
    width = getattr(lin, "in_features", None)
    if not width:
        width = lin.weight.shape[1]
        if getattr(lin, "in_features", None) == 0:
            lin.in_features = width
    if x.shape[-1] != width:
        raise ValueError(f"{name} has {x.shape[-1]} features per row but the layer was built for "
                         f"{width} (in_channels / edge_dim)")


def glorot(t: Optional[Tensor]):
    if t is not None:
        a = math.sqrt(6.0 / (t.size(-2) + t.size(-1)))
        with torch.no_grad():
            t.uniform_(-a, a)


def reset_linear(lin: Optional[nn.Module]) -> None:
    """Glorot weight and (PyG's rule) a bias uniform in +-1/sqrt(fan_in)."""
    if lin is None or is_lazy(lin):
        return
    glorot(lin.weight)
    if getattr(lin, "bias", None) is not None:
        bound = 1.0 / math.sqrt(lin.weight.size(1)) if lin.weight.size(1) > 0 else 0.0
        with torch.no_grad():
            lin.bias.uniform_(-bound, bound)


def head_weights(att: Tensor, weight: Tensor) -> Tensor:
    """W_head^T a_head for every head: [H, F] from att [1, H, C] and a Linear weight
    [H*C, F], so that x @ head_weights(att, W).t() = <a, W x> per head without an
    [N, H, C] temporary."""
    H, C = att.shape[-2], att.shape[-1]
    return (att.reshape(H, C, 1) * weight.view(H, C, -1)).sum(1)


def autocast_on(device_type: str) -> bool:
    """Whether torch.autocast is active for this device type."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:  # a device type autocast does not know (meta): no autocast there
        return False


def _sorted_by_destination(edge_index, num_src: int, num_dst: int):
    """(rowptr, col) when ``edge_index`` already is a CSR by destination of the right size:
    a torch sparse CSR adjacency [num_dst, num_src], or PyG's EdgeIndex sorted by
    destination with sparse size (num_src, num_dst). None otherwise."""
    if isinstance(edge_index, Tensor) and edge_index.layout == torch.sparse_csr:
        return edge_index.crow_indices(), edge_index.col_indices()
    if (type(edge_index) is not Tensor and isinstance(edge_index, Tensor)
            and getattr(edge_index, "is_sorted_by_col", False) and hasattr(edge_index, "get_csc")):
        try:
            if tuple(edge_index.sparse_size()) != (num_src, num_dst):
                return None  # a size not (fully) known: the general path checks the ids
            (colptr, row), perm = edge_index.get_csc()
        except Exception:  # an EdgeIndex this code does not know: take the general path
            return None
        if perm is None:
            return colptr.as_subclass(Tensor), row.as_subclass(Tensor)
    return None


class AttentionBase(_Base):
    """Constructor checks, graph preparation and output head of both attention layers."""

    def __init__(self, in_channels, out_channels: int, heads: int, concat: bool,
                 negative_slope: float, dropout: float, add_self_loops: bool,
                 edge_dim: Optional[int], fill_value, residual: bool):
        if HAS_PYG:
            _Base.__init__(self, aggr="add", node_dim=0)
        else:
            _Base.__init__(self)
        if not isinstance(out_channels, int) or isinstance(out_channels, bool) or out_channels <= 0:
            raise ValueError(f"out_channels must be a positive int, got {out_channels!r}")
        if not isinstance(heads, int) or isinstance(heads, bool) or heads <= 0:
            raise ValueError(f"heads must be a positive int, got {heads!r}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        check_slope(negative_slope)
        if isinstance(fill_value, str) and fill_value not in FILL_REDUCE:
            raise ValueError(f"fill_value must be a number, a tensor or one of {sorted(FILL_REDUCE)}, "
                             f"got {fill_value!r}")
        if not (isinstance(in_channels, int) or (isinstance(in_channels, (tuple, list))
                                                 and len(in_channels) == 2)):
            raise ValueError(f"in_channels must be an int or a (src, dst) pair, got {in_channels!r}")
        # PyG's attribute names: code written against GATConv reads them.
        self.in_channels, self.out_channels, self.heads = in_channels, out_channels, heads
        self.concat, self.negative_slope, self.dropout = concat, negative_slope, dropout
        self.add_self_loops, self.edge_dim, self.fill_value = add_self_loops, edge_dim, fill_value
        self.residual = residual
        self.cache_graph = True
        self._graph_cache = None

    def _residual_and_bias(self, bias: bool):
        total_out = self.out_channels * (self.heads if self.concat else 1)
        if self.residual:
            res_in = self.in_channels if isinstance(self.in_channels, int) else self.in_channels[1]
            self.res = linear(res_in, total_out, "in_channels")
        else:
            self.register_parameter("res", None)
        if bias:
            self.bias = nn.Parameter(torch.empty(total_out))
        else:
            self.register_parameter("bias", None)

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def _split_x(x) -> Tuple[Tensor, Optional[Tensor], bool]:
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
        return x_src, x_dst, same

    @staticmethod
    def _sizes(x_src: Tensor, x_dst: Optional[Tensor], edge_index, size) -> Tuple[int, int]:
        """(num_src, num_dst), as PyG's MessagePassing settles them: a sparse adjacency
        [N_dst, N_src], an EdgeIndex's sparse size or a Graph define them, ``size`` may give
        them, and every node tensor must agree (ValueError naming what disagrees)."""
        num_src, num_dst, given_by = None, None, None
        if isinstance(edge_index, Graph):
            num_src, num_dst, given_by = edge_index.num_src, edge_index.num_dst, "edge_index (a Graph)"
        elif isinstance(edge_index, Tensor) and edge_index.layout in (torch.sparse_coo, torch.sparse_csr):
            if edge_index.sparse_dim() != 2 or edge_index.dim() - edge_index.dense_dim() != 2:
                raise ValueError("edge_index: a sparse adjacency must be one [N_dst, N_src] matrix "
                                 f"(no batch dimension), got shape {list(edge_index.shape)}")
            if edge_index.dense_dim() > 0:
                raise ValueError("edge_index: a sparse adjacency with feature values [N_dst, N_src, F] "
                                 f"(shape {list(edge_index.shape)}) is not taken - its values would be "
                                 "ignored; pass an [N_dst, N_src] adjacency and the features as "
                                 "edge_attr, in its coalesced order")
            num_dst, num_src = int(edge_index.shape[0]), int(edge_index.shape[1])
            given_by = f"edge_index (a sparse adjacency of shape [N_dst, N_src] = {list(edge_index.shape[:2])})"
        elif type(edge_index) is not Tensor and hasattr(edge_index, "sparse_size"):
            try:
                num_src, num_dst = edge_index.sparse_size()  # PyG's EdgeIndex: None when unknown
            except Exception:
                num_src = num_dst = None
            given_by = f"edge_index (an EdgeIndex of sparse size ({num_src}, {num_dst}))"
        if size is not None:
            if not (isinstance(size, (tuple, list)) and len(size) == 2):
                raise ValueError(f"size must be None or a (num_src, num_dst) pair, got {size!r}")
            for i, v in enumerate(_parse_size(size)):
                have = (num_src, num_dst)[i]
                if v is not None and have is not None and v != have:
                    raise ValueError(f"size[{i}] = {v} but {given_by} gives {have}")
            size_src, size_dst = _parse_size(size)
            num_src = size_src if size_src is not None else num_src
            num_dst = size_dst if size_dst is not None else num_dst
            given_by = given_by or "size"
        if num_src is None:
            num_src = x_src.shape[0]
        elif x_src.shape[0] != num_src:
            raise ValueError(f"x_src (x) has {x_src.shape[0]} nodes but {given_by} gives "
                             f"num_src = {num_src}")
        if num_dst is None:
            num_dst = x_dst.shape[0] if x_dst is not None else num_src
        elif x_dst is not None and x_dst.shape[0] != num_dst:
            raise ValueError(f"x_dst (x) has {x_dst.shape[0]} nodes but {given_by} gives "
                             f"num_dst = {num_dst}")
        return num_src, num_dst

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
        ready = None if (self.add_self_loops or _is_compiling()) else _sorted_by_destination(
            edge_index, num_src, num_dst)
        if ready is not None:  # already CSR by destination: used as is, nothing sorted
            return GATGraph(Graph.from_csr(ready[0], ready[1], num_src), num_dst)
        if isinstance(edge_index, Tensor) and edge_index.layout != torch.strided:
            return GATGraph.from_edge_index(sparse_to_edge_index(edge_index), num_src, num_dst,
                                            self.add_self_loops)
        if not isinstance(edge_index, Tensor):
            raise ValueError("edge_index must be a [2, E] tensor, a neptune_ext.Graph or a torch "
                             f"sparse adjacency, got {type(edge_index).__name__}")
        given = edge_index  # the cache holds the caller's object (as_tensor() may be a new one)
        if _is_edge_index(edge_index):
            edge_index = edge_index.as_tensor()  # PyG's EdgeIndex: its plain [2, E] data
        key = None
        # A graph built under inference_mode holds inference tensors, which a later training
        # step could not save for backward: such a graph is used once, never cached.
        if (self.cache_graph and not _is_compiling() and not edge_index.is_inference()
                and not torch.is_inference_mode_enabled()):
            key = (edge_index.dtype, edge_index.device, tuple(edge_index.shape), edge_index.stride(),
                   edge_index.storage_offset(), edge_index.data_ptr(), edge_index._version,
                   num_src, num_dst, self.add_self_loops)
            cached = self._graph_cache
            if cached is not None and cached[0] is given and cached[1] == key:
                return cached[2]
        prepared = GATGraph.from_edge_index(edge_index, num_src, num_dst, self.add_self_loops)
        self._graph_cache = (given, key, prepared) if key is not None else None
        return prepared

    def clear_graph_cache(self) -> None:
        """Forget the cached graph (see :meth:`_prepare`)."""
        self._graph_cache = None

    def __getstate__(self):
        # torch.save(model) pickles the module: the graph cache is a cache, not state.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_graph_cache"] = None
        return state

    @staticmethod
    def _check_edge_order(edge_index, edge_attr, want_alpha: bool) -> None:
        """An uncoalesced COO adjacency has no edge order the layer keeps (it is coalesced:
        sorted, duplicates merged), so edge_attr rows or returned attention weights could not
        line up with its entries: a ValueError, as PyG refuses it."""
        if ((edge_attr is not None or want_alpha) and isinstance(edge_index, Tensor)
                and edge_index.layout == torch.sparse_coo and not edge_index.is_coalesced()):
            raise ValueError("edge_index: an uncoalesced sparse COO adjacency with edge_attr or "
                             "return_attention_weights; call edge_index.coalesce() first (edge_attr "
                             "rows and attention weights then follow its coalesced order)")

    @staticmethod
    def _edge_attr_2d(edge_attr) -> Tensor:
        """``edge_attr`` as [E, edge_dim] (a 1-D one is one feature per edge), or a ValueError."""
        if not isinstance(edge_attr, Tensor) or not edge_attr.is_floating_point():
            raise ValueError("edge_attr must be a floating-point tensor [E, edge_dim], got "
                             f"{edge_attr.dtype if isinstance(edge_attr, Tensor) else type(edge_attr).__name__}")
        if edge_attr.dim() == 1:
            return edge_attr.view(-1, 1)
        if edge_attr.dim() != 2:
            raise ValueError(f"edge_attr must have shape [E, edge_dim] (or [E]), got {list(edge_attr.shape)}")
        return edge_attr

    def _edge_attr(self, prepared: GATGraph, edge_attr) -> Tensor:
        """``edge_attr`` [E, edge_dim] (see _edge_attr_2d) checked against the input edges,
        completed for the added self loops."""
        num_in = prepared.num_input_edges
        if edge_attr.dim() != 2 or edge_attr.shape[0] != num_in:
            raise ValueError(f"edge_attr must have one row per edge of edge_index ({num_in} edges, "
                             f"shape [{num_in}, edge_dim]), got {list(edge_attr.shape)}")
        return prepared.edge_attr(edge_attr, self.fill_value)

    def _edge_features(self, prepared: GATGraph, edge_attr, glorot_init: bool = True) -> Optional[Tensor]:
        """``lin_edge`` of the edge attributes, [E, H, C] for the prepared edges (None without
        ``edge_attr``); a ValueError when the layer has no ``lin_edge``."""
        if edge_attr is None:
            return None
        if self.lin_edge is None:
            raise ValueError("edge_attr was given but the layer was built with edge_dim=None; "
                             "pass edge_dim=<number of edge features>")
        edge_attr = self._edge_attr_2d(edge_attr)
        materialize(self.lin_edge, edge_attr, "edge_attr", glorot_init)
        return self.lin_edge(self._edge_attr(prepared, edge_attr)).view(-1, self.heads, self.out_channels)

    # ------------------------------------------------------------------ output
    def _head(self, out: Tensor, res: Optional[Tensor]) -> Tensor:
        # out is [N, H, C], or [N, H * C] (GATv2's op returns the form of its inputs). It is
        # the attention op's output, which the op's autograd saved for its backward: what the
        # layer returns is a new tensor (a copy when nothing else makes one), or a user's
        # in-place op on it (relu_, add_, elu(inplace=True): fine on PyG's layers) would fail
        # the backward's version check.
        fresh = not self.concat
        if self.concat:
            out = out if out.dim() == 2 else out.reshape(-1, self.heads * self.out_channels)
        else:
            out = (out if out.dim() == 3 else out.view(-1, self.heads, self.out_channels)).mean(dim=1)
        if res is not None:
            out, fresh = out + res, True
        if self.bias is not None:
            out, fresh = out + self.bias, True
        # (no copy where autograd saved nothing: under no_grad/inference_mode, or no gradient)
        return out if fresh or not (torch.is_grad_enabled() and out.requires_grad) else out.clone()

    @staticmethod
    def _with_attention(out: Tensor, alpha: Tensor, prepared: GATGraph, edge_index,
                        num_src: int, num_dst: int):
        alpha = alpha[prepared.kept_edges()]
        ei_out = prepared.output_edge_index()
        if isinstance(edge_index, Tensor) and edge_index.layout == torch.sparse_csr:
            # PyG returns the weights in the adjacency's own layout: a CSR [N_dst, N_src, H],
            # alpha in its order - the input's own order, or, with self loops added, sorted
            # by destination, then source (PyG coalesces the graph it adds loops to).
            src, dst = ei_out[0], ei_out[1]
            perm = torch.argsort(dst * max(num_src, 1) + src if prepared.add_loops else dst, stable=True)
            crow = torch.zeros(num_dst + 1, dtype=torch.int64, device=dst.device)
            crow[1:] = torch.bincount(dst, minlength=num_dst).cumsum(0)
            alpha = alpha[perm]
            adj = torch.sparse_csr_tensor(crow, src[perm], alpha, (num_dst, num_src, alpha.shape[1]))
            return out, (adj, alpha)
        if isinstance(edge_index, Tensor) and edge_index.layout != torch.strided:
            adj = torch.sparse_coo_tensor(torch.stack([ei_out[1], ei_out[0]]), alpha,
                                          (num_dst, num_src, alpha.shape[1]))
            return out, (adj, alpha)
        if _is_edge_index(edge_index):  # PyG's EdgeIndex: as GATConv, an EdgeIndex back
            if not prepared.add_loops:
                return out, (edge_index, alpha)  # the very input (its edges, in its order)
            return out, (type(edge_index)(ei_out, sparse_size=(num_src, num_dst)), alpha)
        return out, (ei_out, alpha)

    # --------------------------------------------------- PyG's explain path
    def _explaining(self) -> bool:
        """PyG's explain mode (GNNExplainer's edge mask), or MessagePassing hooks on the layer
        (AttentionExplainer collects the weights with a message hook): the layer then runs
        PyG's propagate path, whose hooks see what they would see in PyG's layer. (Edge-update
        hooks do not run: no edge_updater is called.)"""
        return HAS_PYG and (bool(getattr(self, "_explain", False))
                            or any(getattr(self, name, None) for name in _PROPAGATE_HOOKS))

    def _explain_aggregate(self, x_j_src: Tensor, alpha_kept: Tensor, prepared: GATGraph,
                           num_src: int, num_dst: int) -> Tensor:
        """out = sum_j alpha_ij x_j through MessagePassing.propagate over the output edges
        (input edges without self loops, then the added loops: GATConv's order), so an
        explainer's edge mask multiplies each message exactly as in PyG's layer."""
        return self.propagate(prepared.output_edge_index(), x=(x_j_src, None), alpha=alpha_kept,
                              size=(num_src, num_dst))

    def message(self, x_j: Tensor, alpha: Tensor) -> Tensor:
        return x_j * alpha.unsqueeze(-1)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, heads={self.heads})"
