"""One small forward + backward of every CUDA graph-attention kernel family (GAT and GATv2), for
compute-sanitizer (scripts/gpu_check.sh runs it under memcheck, racecheck,
initcheck and synccheck).

The graph is small (the sanitizers slow kernels down 10-100x) but has a
destination hub and a source hub longer than one leaf segment (256 edges), so
the leaf and merge-level kernels of all three reductions run, next to short and
empty rows. Shapes cover the vector paths (one and two slots per thread) and the
scalar path; dtypes fp32, bf16, fp16 and fp64; int32 and int64 indices; edge
logits and dropout.
"""
import sys

import torch

from neptune_ext import Graph, _ext


def graph(device):
    g = torch.Generator().manual_seed(0)
    n = 600
    hub_in = torch.stack([torch.randint(0, n, (9000,), generator=g), torch.full((9000,), 5)])
    hub_out = torch.stack([torch.full((3000,), 11), torch.randint(0, n, (3000,), generator=g)])
    rest = torch.randint(0, n - 100, (2, 4000), generator=g)  # the last 100 nodes: no edges
    ei = torch.cat([hub_in, hub_out, rest], 1)
    ei = ei[:, torch.randperm(ei.shape[1], generator=g)]
    return Graph.from_edge_index(ei.to(device), (n, n))


def _all_finite(*tensors):
    torch.cuda.synchronize()
    for t in tensors:
        assert torch.isfinite(t).all()


def run(g, H, C, dtype, p):
    dev = g.device
    n, E = g.num_src, g.num_edges
    h = torch.randn(n, H, C, device=dev).to(dtype)
    ss, sd = torch.randn(n, H, device=dev).to(dtype), torch.randn(n, H, device=dev).to(dtype)
    el = torch.randn(E, H, device=dev).to(dtype)
    seed = torch.tensor(3) if p > 0 else None
    out, lse = torch.ops.neptune.gat_forward(h, ss, sd, g.rowptr, g.col, g.eid, *g.csc(), el, 0.2,
                                             p, seed)
    grads = torch.ops.neptune.gat_backward(torch.randn_like(out), h, ss, sd, g.rowptr, g.col, g.eid,
                                           *g.csc(), el, out, lse, 0.2, p, seed)
    _all_finite(out, lse, *grads)


def run_v2(g, H, C, dtype, p, rows=None):
    """The GATv2 kernels; `rows` < num_dst leaves the last graph rows ignored."""
    dev = g.device
    n, E = g.num_src, g.num_edges
    rows = g.num_dst if rows is None else rows
    xl, xr = torch.randn(n, H, C, device=dev).to(dtype), torch.randn(rows, H, C, device=dev).to(dtype)
    att = (torch.randn(H, C, device=dev) / C**0.5).to(dtype)
    ef = torch.randn(E, H, C, device=dev).to(dtype)
    seed = torch.tensor(3) if p > 0 else None
    out, lse = torch.ops.neptune.gatv2_forward(xl, xr, att, g.rowptr, g.col, g.eid, *g.csc(), ef, 0.2,
                                               p, seed)
    grads = torch.ops.neptune.gatv2_backward(torch.randn_like(out), xl, xr, att, g.rowptr, g.col, g.eid,
                                             *g.csc(), ef, out, lse, 0.2, p, seed)
    _all_finite(out, lse, *grads)


def main():
    if "cuda" not in _ext.compiled_backends():
        sys.exit("neptune_ext was built without CUDA kernels")
    g32 = graph("cuda")
    g64 = Graph(g32.rowptr.long(), g32.col.long(), g32.eid.long(), g32.edge_index, g32.num_src,
                g32.num_dst)
    g64._csc = tuple(t.long() for t in g32.csc())
    cases = [
        (g32, 4, 64, torch.float32, 0.0),   # fp32 vectors, 2 slots per thread
        (g32, 4, 64, torch.bfloat16, 0.1),  # bf16 vectors, 1 slot, dropout
        (g64, 2, 16, torch.float16, 0.0),   # int64 indices, lane groups of 4
        (g32, 3, 7, torch.float32, 0.2),    # scalar path
        (g64, 2, 5, torch.float64, 0.1),    # fp64
        (g32, 12, 96, torch.bfloat16, 0.0), # several tiles per row
    ]
    for g, H, C, dtype, p in cases:
        run(g, H, C, dtype, p)
        print(f"ok: index={g.index_dtype} H={H} C={C} {dtype} dropout={p}", flush=True)
    v2_cases = [
        (g32, 4, 32, torch.float32, 0.0, None),   # C = 32: one slot per lane and head
        (g64, 2, 64, torch.bfloat16, 0.1, 590),   # C > 32, ignored rows, dropout
        (g32, 3, 5, torch.float16, 0.0, None),    # C not a power of two
        (g32, 8, 4, torch.float64, 0.2, None),    # heads inside one lane group
    ]
    for g, H, C, dtype, p, rows in v2_cases:
        run_v2(g, H, C, dtype, p, rows)
        print(f"ok (GATv2): index={g.index_dtype} H={H} C={C} {dtype} dropout={p} rows={rows}", flush=True)


if __name__ == "__main__":
    main()
