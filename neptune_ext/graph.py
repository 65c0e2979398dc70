"""Graph: a COO edge list turned into CSR by destination, plus its cached transpose.

The kernels walk the in-edges of each destination (CSR: ``rowptr``, ``col``) in
forward and in backward pass 1, and the out-edges of each source (CSC:
``colptr``, ``csc_row``, ``csc_perm``) in backward pass 2. ``eid`` maps each CSR
position to the caller's edge id, so per-edge inputs (edge logits) and outputs
(attention weights) stay in the caller's order.

Safety: with the compiled extension, graphs are built by ``neptune::build_csr`` /
``neptune::build_csc``, which check every node id (a ValueError naming
``edge_index``, also under torch.compile) and mark their outputs as checked; every
kernel entry checks any graph it was not handed that way (a hand-built
``Graph``, one whose index tensors were modified in place, a direct
``torch.ops.neptune`` call) before reading it. See ``csrc/graph/graph.h``.
"""
import operator
from typing import Optional, Sequence, Tuple, Union

import torch

from . import _ext, backend as _backend
from ._util import is_compiling as _is_compiling

_INT32_MAX = 2**31 - 1

SizeLike = Union[None, int, Tuple[Optional[int], Optional[int]], Sequence[Optional[int]]]


def _index_dtype(num_edges: int, num_nodes: int) -> torch.dtype:
    return torch.int32 if max(num_edges, num_nodes + 1) <= _INT32_MAX else torch.int64


def _use_graph_ops(device: torch.device) -> bool:
    return _backend.runs_kernel("build_csr", device.type)


def _sort_rows(index: torch.Tensor, num_rows: int, itype: torch.dtype):
    """Stable sort of a row index (pure PyTorch): (rowptr [num_rows + 1], perm [E])."""
    perm = torch.argsort(index, stable=True)
    rowptr = torch.searchsorted(index[perm], torch.arange(num_rows + 1, device=index.device, dtype=index.dtype))
    return rowptr.to(itype), perm.to(itype)


if _ext._C is not None:
    @torch.library.register_fake("neptune::csr_from_index")
    def _csr_from_index_fake(index, num_rows, dtype):
        return index.new_empty((num_rows + 1,), dtype=dtype), index.new_empty(index.shape, dtype=dtype)

    @torch.library.register_fake("neptune::build_csr")
    def _build_csr_fake(edge_index, num_src, num_dst, dtype, replace_self_loops):
        loops = min(num_src, num_dst) if replace_self_loops else 0
        rows = num_dst + (1 if replace_self_loops else 0)
        E = edge_index.shape[1] + loops
        return (edge_index.new_empty((rows + 1,), dtype=dtype), edge_index.new_empty((E,), dtype=dtype),
                edge_index.new_empty((E,), dtype=dtype))

    @torch.library.register_fake("neptune::build_csc")
    def _build_csc_fake(rowptr, col, eid, num_src):
        return col.new_empty((num_src + 1,)), torch.empty_like(col), torch.empty_like(col)


class Graph:
    """A directed graph with ``num_src`` source and ``num_dst`` destination nodes.

    Build it with :meth:`Graph.from_edge_index`. Attributes (read-only, all on one device):

    - ``rowptr`` [num_dst + 1], ``col`` [E]: CSR by destination (``col`` = source ids)
    - ``eid`` [E]: caller edge id of each CSR position
    - ``edge_index`` [2, E] int64: the caller's COO edge list, in the caller's order
    - :meth:`csc` → (``colptr`` [num_src + 1], ``csc_row`` [E], ``csc_perm`` [E]):
      the transpose, built on first use and cached (``csc_perm`` maps CSC positions
      to CSR positions).

    A Graph built with the constructor, or one whose index tensors are modified in
    place, is checked by the kernels before use (ValueError if it is not a valid graph).
    """

    def __init__(self, rowptr, col, eid, edge_index, num_src: int, num_dst: int):
        self._rowptr = rowptr
        self._col = col
        self._eid = eid
        self._edge_index = edge_index
        self._num_src = _as_size(num_src, "num_src", "Graph: ")
        self._num_dst = _as_size(num_dst, "num_dst", "Graph: ")
        self._csc = None

    def __getstate__(self):
        # The COO edge list may still be a lazy builder (a local function): pickle its value.
        state = self.__dict__.copy()
        state["_edge_index"] = self.edge_index
        return state

    rowptr = property(lambda self: self._rowptr, doc="CSR row pointer [num_dst + 1]")
    col = property(lambda self: self._col, doc="source id of every CSR position [E]")
    eid = property(lambda self: self._eid, doc="caller edge id of every CSR position [E]")
    num_src = property(lambda self: self._num_src, doc="number of source nodes")
    num_dst = property(lambda self: self._num_dst, doc="number of destination nodes")

    @property
    def edge_index(self) -> torch.Tensor:
        """The COO edge list [2, E] (int64) in caller edge-id order."""
        if callable(self._edge_index):
            self._edge_index = self._edge_index()
        return self._edge_index

    # ------------------------------------------------------------------ build
    @classmethod
    def from_edge_index(cls, edge_index: torch.Tensor, size: SizeLike = None) -> "Graph":
        """Build from COO ``edge_index`` [2, E] (row 0 = source, row 1 = destination).

        ``size`` is ``num_nodes`` (same for both sides), ``(num_src, num_dst)`` (an
        entry may be None), or None; missing sizes are inferred as max id + 1 over
        *both* rows (as PyG does), so an isolated node with the largest id needs an
        explicit size. Raises ValueError for anything that is not a valid edge list: node
        ids are always checked (the check is part of building the CSR, one host
        synchronization on CUDA).
        """
        ei = _check_edge_index(edge_index)
        num_src, num_dst = _complete_size(ei, _parse_size(size))
        # The Graph keeps its own edge list: a caller's later in-place write to edge_index
        # must not change the edges under a built CSR.
        return cls._build(ei.clone() if ei.dtype == torch.int64 else ei, num_src, num_dst)

    @classmethod
    def from_csr(cls, rowptr: torch.Tensor, col: torch.Tensor, num_src: int) -> "Graph":
        """A graph already sorted by destination: ``rowptr`` [num_dst + 1], ``col`` [E]
        (source ids), e.g. a torch sparse CSR adjacency's ``crow_indices()`` /
        ``col_indices()`` or the CSC of PyG's ``EdgeIndex`` sorted by destination. The
        caller's edge order is the CSR order; nothing is sorted. The kernels check the
        graph on first use (ValueError if it is not a valid CSR graph); without them it is
        checked here."""
        for name, t in (("rowptr", rowptr), ("col", col)):
            if (not isinstance(t, torch.Tensor) or t.dim() != 1 or t.is_floating_point() or t.is_complex()
                    or t.dtype == torch.bool):
                raise ValueError(f"{name} must be a 1-D integer tensor, got "
                                 f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}"
                                 f"{list(t.shape) if isinstance(t, torch.Tensor) else ''}")
        num_src = _as_size(num_src, "num_src", "Graph.from_csr: ")
        if num_src is None:
            raise ValueError("Graph.from_csr: num_src must be a non-negative int (the number of "
                             "source nodes), got None")
        num_dst, E = rowptr.shape[0] - 1, col.shape[0]
        if num_dst < 0:
            raise ValueError("rowptr must have num_dst + 1 >= 1 entries")
        itype = _index_dtype(E, max(num_src, num_dst))
        for name, t, hi in (("rowptr", rowptr, E), ("col", col, num_src - 1)):
            _check_fits(t, itype, name, hi)
        rowptr, col = rowptr.to(itype).contiguous(), col.to(itype).contiguous()
        kernels_check = _use_graph_ops(col.device)
        if not kernels_check and not _is_compiling():  # the reference will index with these ids
            r64 = rowptr.long()
            ok = bool(r64[0] == 0) and bool(r64[-1] == E) and bool((r64[1:] >= r64[:-1]).all())
            if not ok or (E and (int(col.min()) < 0 or int(col.max()) >= num_src)):
                raise ValueError(f"rowptr/col are not a CSR graph over {num_src} sources "
                                 "(rowptr must rise from 0 to E, col must hold ids in [0, num_src))")
        eid = torch.arange(E, dtype=itype, device=col.device)

        def coo():
            dst = torch.repeat_interleave(torch.arange(num_dst, device=col.device), rowptr.long().diff())
            return torch.stack([col.long(), dst])
        return cls(rowptr, col, eid, coo, num_src, num_dst)

    @classmethod
    def _build(cls, ei: torch.Tensor, num_src: int, num_dst: int) -> "Graph":
        E = ei.shape[1]
        itype = _index_dtype(E, max(num_src, num_dst))
        if _use_graph_ops(ei.device):
            rowptr, col, eid = torch.ops.neptune.build_csr(ei, num_src, num_dst, itype, False)
            return cls(rowptr, col, eid, ei.to(torch.int64), num_src, num_dst)
        ei = ei.to(torch.int64)
        if not _is_compiling():
            check_node_ids(ei, num_src, num_dst)
        rowptr, perm = _sort_rows(ei[1], num_dst, itype)
        return cls(rowptr, ei[0][perm].to(itype), perm, ei, num_src, num_dst)

    # ------------------------------------------------------------ properties
    @property
    def num_edges(self) -> int:
        return self._col.shape[0]

    @property
    def device(self) -> torch.device:
        return self._col.device

    @property
    def index_dtype(self) -> torch.dtype:
        return self._col.dtype

    def in_degree(self) -> torch.Tensor:
        """Number of in-edges of every destination [num_dst]."""
        return (self._rowptr[1:] - self._rowptr[:-1]).to(torch.int64)

    def csc(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The transposed graph (colptr, csc_row, csc_perm), built once and cached."""
        if self._csc is None:
            if _use_graph_ops(self.device):
                self._csc = torch.ops.neptune.build_csc(self._rowptr, self._col, self._eid, self.num_src)
            else:
                colptr, perm = _sort_rows(self._col, self.num_src, self.index_dtype)
                dst_sorted = torch.repeat_interleave(
                    torch.arange(self.num_dst, device=self.device), self.in_degree(),
                    output_size=self.num_edges)
                self._csc = (colptr, dst_sorted[perm].to(self.index_dtype), perm)
        return self._csc

    # ------------------------------------------------------------ transforms
    def add_self_loops(self) -> "Graph":
        """A new Graph with an edge i -> i appended for every i < min(num_src, num_dst)
        (after the existing edges, in the caller's order). Existing self loops are kept."""
        n = min(self.num_src, self.num_dst)
        loops = torch.arange(n, device=self.device, dtype=torch.int64).unsqueeze(0).expand(2, -1)
        return Graph._build(torch.cat([self.edge_index, loops], dim=1), self.num_src, self.num_dst)

    def to(self, device) -> "Graph":
        """The same graph on ``device`` (cached transpose included)."""
        device = torch.device(device)
        if device == self.device:
            return self
        g = Graph(self._rowptr.to(device), self._col.to(device), self._eid.to(device),
                  self.edge_index.to(device), self.num_src, self.num_dst)
        if self._csc is not None:
            g._csc = tuple(t.to(device) for t in self._csc)
        return g

    def __repr__(self) -> str:
        return (f"Graph(num_src={self.num_src}, num_dst={self.num_dst}, num_edges={self.num_edges}, "
                f"index_dtype={self.index_dtype}, device={self.device})")


def sparse_to_edge_index(adj: torch.Tensor) -> torch.Tensor:
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


def check_node_ids(edge_index: torch.Tensor, num_src: int, num_dst: int) -> None:
    """ValueError unless every id of COO ``edge_index`` [2, E] is in [0, num_src) x [0, num_dst).
    One host synchronization (three reductions read back together). A ``meta`` tensor has no
    ids to check (shape inference on the meta device passes)."""
    if edge_index.numel() == 0 or edge_index.device.type == "meta":
        return
    lo, max_src, max_dst = torch.stack([edge_index.min(), edge_index[0].max(),
                                        edge_index[1].max()]).tolist()
    if lo < 0:
        raise ValueError(f"edge_index contains a negative node id ({lo})")
    if max_src >= num_src:
        raise ValueError(f"edge_index[0] (sources) contains node id {max_src}, "
                         f"outside [0, num_src={num_src})")
    if max_dst >= num_dst:
        raise ValueError(f"edge_index[1] (destinations) contains node id {max_dst}, "
                         f"outside [0, num_dst={num_dst})")


def _check_edge_index(edge_index) -> torch.Tensor:
    if not isinstance(edge_index, torch.Tensor):
        raise ValueError(f"edge_index must be a torch.Tensor of shape [2, E], got {type(edge_index).__name__}")
    if edge_index.is_floating_point() or edge_index.is_complex() or edge_index.dtype == torch.bool:
        raise ValueError(f"edge_index must be an integer tensor (an integer dtype), got {edge_index.dtype}")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must have shape [2, E], got {list(edge_index.shape)}")
    return edge_index


def _complete_size(ei: torch.Tensor, size: Tuple[Optional[int], Optional[int]]) -> Tuple[int, int]:
    """Fill the missing entries of (num_src, num_dst) with max id + 1 (one host sync)."""
    num_src, num_dst = size
    if num_src is not None and num_dst is not None:
        return num_src, num_dst
    if _is_compiling():
        raise ValueError("under torch.compile, pass size=(num_src, num_dst) to Graph.from_edge_index")
    if ei.dtype in (torch.uint16, torch.uint32, torch.uint64):  # (no max() for these)
        ei = ei.to(torch.int64)
    inferred = int(ei.max()) + 1 if ei.shape[1] > 0 else 0
    if inferred > _INT32_MAX:
        raise ValueError(f"edge_index contains node id {inferred - 1}: with size=None the number of "
                         f"nodes is inferred as max id + 1 = {inferred}, more than 2^31 - 1; pass "
                         "size=(num_src, num_dst) if the graph really has that many nodes")
    return (inferred if num_src is None else num_src), (inferred if num_dst is None else num_dst)


def _as_size(v, name: str, where: str = "size: "):
    if v is None or isinstance(v, torch.SymInt):
        return v
    if isinstance(v, bool) or (isinstance(v, torch.Tensor) and (v.is_floating_point() or v.numel() != 1)):
        raise ValueError(f"{where}{name} must be a non-negative int or None, got {v!r}")
    try:
        v = operator.index(v)
    except TypeError:
        raise ValueError(f"{where}{name} must be a non-negative int or None, got {v!r}") from None
    if v < 0:
        raise ValueError(f"{where}{name} must be a non-negative int or None, got {v}")
    return v


def _check_fits(t: torch.Tensor, itype: torch.dtype, name: str, hi: int) -> None:
    """ValueError unless the ids in ``t`` survive the cast to ``itype``: a narrowing cast
    would wrap 2**32 + 1 to 1, a valid-looking id. Checked (one host sync) only when the
    cast narrows; the graph check then validates the values themselves."""
    if t.numel() == 0 or _is_compiling() or torch.iinfo(t.dtype).bits <= torch.iinfo(itype).bits:
        return
    if t.dtype == torch.uint64:  # no reductions for uint64: values past int64 turn negative
        t = t.to(torch.int64)
    lo_v, hi_v = torch.aminmax(t)
    info = torch.iinfo(itype)
    if int(lo_v) < info.min or int(hi_v) > info.max:
        bad = int(hi_v) if int(hi_v) > info.max else int(lo_v)
        raise ValueError(f"{name} contains {bad}, which is not a valid entry (expected values in "
                         f"[0, {hi}])")


def _parse_size(size: SizeLike) -> Tuple[Optional[int], Optional[int]]:
    if size is None:
        return None, None
    if isinstance(size, (tuple, list)):
        if len(size) != 2:
            raise ValueError(f"size must be None, an int or a (num_src, num_dst) pair, got {size!r}")
        return _as_size(size[0], "num_src"), _as_size(size[1], "num_dst")
    try:
        n = _as_size(size, "num_nodes")
    except ValueError:
        raise ValueError(f"size must be None, an int or a (num_src, num_dst) pair, got {size!r}") from None
    return n, n
