"""Graph: a COO edge list turned into CSR by destination, plus its cached transpose.

The kernels walk the in-edges of each destination (CSR: ``rowptr``, ``col``) in
forward and in backward pass 1, and the out-edges of each source (CSC:
``colptr``, ``csc_row``, ``csc_perm``) in backward pass 2. ``eid`` maps each CSR
position to the caller's edge id, so per-edge inputs (edge logits) and outputs
(attention weights) stay in the caller's order.

Construction is plain tensor work (stable sorts and searchsorted), so it runs on
the graph's device and traces under torch.compile.
"""
from typing import Optional, Sequence, Tuple, Union

import torch

from . import _ext

_INT32_MAX = 2**31 - 1

SizeLike = Union[None, int, Tuple[Optional[int], Optional[int]], Sequence[Optional[int]]]


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # torch < 2.3
        return False


def _index_dtype(num_edges: int, num_nodes: int) -> torch.dtype:
    return torch.int32 if max(num_edges, num_nodes + 1) <= _INT32_MAX else torch.int64


def _sort_rows(index: torch.Tensor, num_rows: int, itype: torch.dtype):
    """Stable sort of a row index: (rowptr [num_rows + 1], perm [E]), both of dtype itype.

    CPU: the counting-sort kernel (O(E + N)); elsewhere a stable argsort."""
    if index.device.type == "cpu" and _ext.use_kernels("cpu"):
        return torch.ops.neptune.csr_from_index(index, num_rows, itype)
    perm = torch.argsort(index, stable=True)
    rowptr = torch.searchsorted(index[perm], torch.arange(num_rows + 1, device=index.device, dtype=index.dtype))
    return rowptr.to(itype), perm.to(itype)


if _ext._C is not None:
    @torch.library.register_fake("neptune::csr_from_index")
    def _csr_from_index_fake(index, num_rows, dtype):
        return index.new_empty((num_rows + 1,), dtype=dtype), index.new_empty(index.shape, dtype=dtype)


class Graph:
    """A directed graph with ``num_src`` source and ``num_dst`` destination nodes.

    Build it with :meth:`Graph.from_edge_index`. Attributes (all on one device):

    - ``rowptr`` [num_dst + 1], ``col`` [E]: CSR by destination (``col`` = source ids)
    - ``eid`` [E]: caller edge id of each CSR position
    - ``edge_index`` [2, E] int64: the caller's COO edge list, in the caller's order
    - :meth:`csc` → (``colptr`` [num_src + 1], ``csc_row`` [E], ``csc_perm`` [E]):
      the transpose, built on first use and cached (``csc_perm`` maps CSC positions
      to CSR positions).
    """

    def __init__(self, rowptr, col, eid, edge_index, num_src: int, num_dst: int):
        self.rowptr = rowptr
        self.col = col
        self.eid = eid
        self.edge_index = edge_index
        self.num_src = int(num_src)
        self.num_dst = int(num_dst)
        self._csc = None

    # ------------------------------------------------------------------ build
    @classmethod
    def from_edge_index(cls, edge_index: torch.Tensor, size: SizeLike = None,
                        validate: bool = True) -> "Graph":
        """Build from COO ``edge_index`` [2, E] (row 0 = source, row 1 = destination).

        ``size`` is ``num_nodes`` (same for both sides), ``(num_src, num_dst)`` (an
        entry may be None), or None; missing sizes are inferred as max id + 1 over
        *both* rows (as PyG does), so an isolated node with the largest id needs an
        explicit size. Raises ValueError for anything that is not a valid edge list.
        """
        if not isinstance(edge_index, torch.Tensor):
            raise ValueError(f"edge_index must be a torch.Tensor of shape [2, E], got {type(edge_index).__name__}")
        if edge_index.is_floating_point() or edge_index.is_complex() or edge_index.dtype == torch.bool:
            raise ValueError(f"edge_index must have an integer dtype, got {edge_index.dtype}")
        if edge_index.dim() != 2 or edge_index.shape[0] != 2:
            raise ValueError(f"edge_index must have shape [2, E], got {list(edge_index.shape)}")
        num_src, num_dst = _parse_size(size)
        E = edge_index.shape[1]
        ei = edge_index.to(torch.int64)
        checking = validate and not _is_compiling()
        if num_src is None or num_dst is None:
            if _is_compiling():
                raise ValueError("under torch.compile, pass size=(num_src, num_dst) to Graph.from_edge_index")
            inferred = int(ei.max()) + 1 if E > 0 else 0
            num_src = inferred if num_src is None else num_src
            num_dst = inferred if num_dst is None else num_dst
        if checking:
            check_node_ids(ei, num_src, num_dst)
        return cls._build(ei, num_src, num_dst)

    @classmethod
    def _build(cls, ei: torch.Tensor, num_src: int, num_dst: int) -> "Graph":
        E = ei.shape[1]
        device = ei.device
        itype = _index_dtype(E, max(num_src, num_dst))
        src, dst = ei[0], ei[1]
        rowptr, perm = _sort_rows(dst, num_dst, itype)
        g = cls(rowptr, src[perm].to(itype), perm, ei, num_src, num_dst)
        g._dst_sorted = dst[perm]
        return g

    # ------------------------------------------------------------ properties
    @property
    def num_edges(self) -> int:
        return self.col.shape[0]

    @property
    def device(self) -> torch.device:
        return self.col.device

    @property
    def index_dtype(self) -> torch.dtype:
        return self.col.dtype

    def in_degree(self) -> torch.Tensor:
        """Number of in-edges of every destination [num_dst]."""
        return (self.rowptr[1:] - self.rowptr[:-1]).to(torch.int64)

    def csc(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The transposed graph (colptr, csc_row, csc_perm), built once and cached."""
        if self._csc is None:
            colptr, perm = _sort_rows(self.col, self.num_src, self.index_dtype)
            dst_sorted = getattr(self, "_dst_sorted", None)
            if dst_sorted is None:
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
        g = Graph(self.rowptr.to(device), self.col.to(device), self.eid.to(device),
                  self.edge_index.to(device), self.num_src, self.num_dst)
        if getattr(self, "_dst_sorted", None) is not None:
            g._dst_sorted = self._dst_sorted.to(device)
        if self._csc is not None:
            g._csc = tuple(t.to(device) for t in self._csc)
        return g

    def __repr__(self) -> str:
        return (f"Graph(num_src={self.num_src}, num_dst={self.num_dst}, num_edges={self.num_edges}, "
                f"index_dtype={self.index_dtype}, device={self.device})")


def check_node_ids(edge_index: torch.Tensor, num_src: int, num_dst: int) -> None:
    """ValueError unless every id of COO ``edge_index`` [2, E] is in [0, num_src) x [0, num_dst).
    One host synchronization (three reductions read back together)."""
    if edge_index.numel() == 0:
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


def _parse_size(size: SizeLike) -> Tuple[Optional[int], Optional[int]]:
    if size is None:
        return None, None
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 0:
            raise ValueError(f"size must be non-negative, got {size}")
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2:
        out = []
        for name, v in zip(("num_src", "num_dst"), size):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ValueError(f"size: {name} must be a non-negative int or None, got {v!r}")
            out.append(v)
        return out[0], out[1]
    raise ValueError(f"size must be None, an int or a (num_src, num_dst) pair, got {size!r}")
