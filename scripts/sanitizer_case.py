"""One small case of every CUDA kernel family, for compute-sanitizer (scripts/gpu_check.sh
runs it under memcheck and racecheck; initcheck and synccheck on request):

    python scripts/sanitizer_case.py [gat gatv2 graph bn_relu cutlass cudnn transformer]
                                     (default: all, in that order)

gat, gatv2: one forward + backward of the graph-attention kernels; transformer: one forward +
backward of ops.transformer_attention through autograd (the graph-transformer kernels, so
every shape has H * C <= 1024; edge features, dropout, a bipartite graph); graph: build_csr /
build_csc (with GATConv's self loops) and the kernel entries' check of a corrupt graph;
bn_relu: the fused BatchNorm+ReLU forward and backward; cutlass: the implicit-GEMM
convolution (skipped, and said, in a build without CUTLASS); cudnn: the fused
conv+bias+ReLU and conv+bias+add+ReLU calls a Stage's eval takes.

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


def graphs(device):
    """The graph with int32 indices, and the same graph with int64 indices."""
    g32 = graph(device)
    g64 = Graph(g32.rowptr.long(), g32.col.long(), g32.eid.long(), g32.edge_index, g32.num_src,
                g32.num_dst)
    g64._csc = tuple(t.long() for t in g32.csc())
    return g32, g64


def _all_finite(*tensors):
    if any(t.is_cuda for t in tensors):
        torch.cuda.synchronize()
    for t in tensors:
        assert torch.isfinite(t).all()


def run(g, H, C, dtype, p):
    dev = g.device
    n, E = g.num_src, g.num_edges
    h = torch.randn(n, H, C, device=dev).to(dtype)
    ss, sd = torch.randn(n, H, device=dev).to(dtype), torch.randn(n, H, device=dev).to(dtype)
    el = torch.randn(E, H, device=dev).to(dtype)
    _forward_backward("gat", g, (h, ss, sd), el, 0.2, p)


def _forward_backward(family, g, inputs, edge, scalar, p):
    """neptune::<family>_forward and _backward called directly (no autograd, no checks in
    Python: the kernels' own entry checks), every result checked finite."""
    seed = torch.tensor(3) if p > 0 else None
    graph = (g.rowptr, g.col, g.eid, *g.csc())
    out, lse = getattr(torch.ops.neptune, family + "_forward")(*inputs, *graph, edge, scalar, p, seed)
    grads = getattr(torch.ops.neptune, family + "_backward")(torch.randn_like(out), *inputs, *graph,
                                                             edge, out, lse, scalar, p, seed)
    _all_finite(out, lse, *grads)


def run_v2(g, H, C, dtype, p, rows=None):
    """The GATv2 kernels; `rows` < num_dst leaves the last graph rows ignored."""
    dev = g.device
    n, E = g.num_src, g.num_edges
    rows = g.num_dst if rows is None else rows
    xl, xr = torch.randn(n, H, C, device=dev).to(dtype), torch.randn(rows, H, C, device=dev).to(dtype)
    att = (torch.randn(H, C, device=dev) / C**0.5).to(dtype)
    ef = torch.randn(E, H, C, device=dev).to(dtype)
    _forward_backward("gatv2", g, (xl, xr, att), ef, 0.2, p)


def run_transformer(g, H, C, dtype, p, edge_feat=True):
    """ops.transformer_attention forward + backward through autograd (q, k, v and the edge
    features all need gradients, so both backward passes run); on CUDA the compiled kernels,
    never the reference (asserted)."""
    from neptune_ext import ops
    from neptune_ext.attention import spec as attention_spec
    dev = g.device
    if not attention_spec.runs_kernel("transformer_forward", dev.type, H, C, warp_row=True):
        raise AssertionError(f"transformer H={H} C={C} on {dev.type}: no compiled kernel would run")
    q = torch.randn(g.num_dst, H, C, device=dev).to(dtype).requires_grad_()
    k = torch.randn(g.num_src, H, C, device=dev).to(dtype).requires_grad_()
    v = torch.randn(g.num_src, H, C, device=dev).to(dtype).requires_grad_()
    ef = torch.randn(g.num_edges, H, C, device=dev).to(dtype).requires_grad_() if edge_feat else None
    seed = torch.tensor(3) if p > 0 else None
    out = ops.transformer_attention(q, k, v, g, edge_feat=ef, dropout=p, training=p > 0, seed=seed)
    out.backward(torch.randn_like(out))
    _all_finite(out, q.grad, k.grad, v.grad, *(() if ef is None else (ef.grad,)))


def transformer_cases(g32, g64):
    """(graph, H, C, dtype, dropout, edge_feat): every lane layout kind of the warp-per-row
    kernels (one, two, four and 32 features per lane; C a power of two below and above 32,
    and not), every dtype, both index types, and a bipartite graph (N_src != N_dst, so the
    source pass of backward walks other rows than the destination pass)."""
    ei = g32.edge_index  # every index < 600
    bip = Graph.from_edge_index(ei, (g32.num_src + 20, g32.num_dst + 50))
    return [
        (g32, 4, 16, torch.float32, 0.0, True),    # 2 features per lane, heads of 16 lanes
        (g64, 2, 64, torch.bfloat16, 0.1, True),   # int64, C > 32 (2 slots per head), dropout
        (g32, 3, 5, torch.float16, 0.2, False),    # C not a power of two, no edge features
        (g64, 4, 256, torch.bfloat16, 0.0, True),  # H * C = 1024: 32 features per lane (widest)
        (g32, 2, 3, torch.float64, 0.1, True),     # fp64
        (bip, 8, 12, torch.float32, 0.1, True),    # bipartite, 96 features: 3 of 4 slots used
    ]


def graph_family(g):
    """build_csr / build_csc on the device, with and without GATConv's loops, and the kernel
    entry's full check of a graph it was not handed by them (a corrupt one must raise)."""
    ei = g.edge_index
    n = g.num_src
    for loops in (False, True):
        rowptr, col, eid = torch.ops.neptune.build_csr(ei, n, n, torch.int32, loops)
        torch.ops.neptune.build_csc(rowptr, col, eid, n)
    bad = Graph(g.rowptr.clone(), g.col.clone(), g.eid.clone(), ei, n, n)
    bad.col[7] = n + 5  # out of range: the entry check must refuse it, not read it
    h = torch.randn(n, 2, 8, device=ei.device)
    s = torch.randn(n, 2, device=ei.device)
    try:
        torch.ops.neptune.gat_forward(h, s, s, bad.rowptr, bad.col, bad.eid, *g.csc(), None, 0.2, 0.0, None)
    except (ValueError, RuntimeError):
        pass
    else:
        raise AssertionError("a corrupt graph was not refused")
    torch.cuda.synchronize()


def bn_relu_family():
    for dtype, shape in ((torch.float32, (4, 16, 9, 9)), (torch.bfloat16, (2, 64, 5, 7)),
                         (torch.float16, (3, 8, 1, 1))):
        x = torch.randn(shape, device="cuda").to(dtype)
        for fmt in (torch.contiguous_format, torch.channels_last):
            xf = x.contiguous(memory_format=fmt)
            w, b = torch.rand(shape[1], device="cuda") + 0.5, torch.randn(shape[1], device="cuda")
            y, mean, var, invstd = torch.ops.neptune.bn_relu_forward(xf, w, b, 1e-5)
            grads = torch.ops.neptune.bn_relu_backward(torch.randn_like(y), xf, w, b, mean, invstd)
            _all_finite(y, mean, var, invstd, *grads)


def cutlass_family():
    if _ext.BUILD_INFO.get("cutlass") != "1":
        print("cutlass: not built (no CUTLASS headers at build time): skipped", flush=True)
        return
    cl = torch.channels_last
    for dtype in (torch.float16, torch.bfloat16):
        for residual in (False, True):
            x = torch.randn(2, 32, 15, 17, device="cuda", dtype=dtype).contiguous(memory_format=cl)
            w = (torch.randn(64, 32, 3, 3, device="cuda") / 17).to(dtype).contiguous(memory_format=cl)
            b = torch.randn(64, device="cuda", dtype=dtype)
            r = torch.randn(2, 64, 15, 17, device="cuda", dtype=dtype).contiguous(memory_format=cl) if residual else None
            out = torch.ops.neptune.conv_bias_act(x, w, b, r, [1, 1], [1, 1], [1, 1], 1)
            _all_finite(out)


def cudnn_family():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(2, 16, 12, 12, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(32, 16, 3, 3, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
        b = torch.randn(32, device="cuda", dtype=dtype)
        z = torch.randn(2, 32, 12, 12, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
        _all_finite(torch.cudnn_convolution_relu(x, w, b, [1, 1], [1, 1], [1, 1], 1),
                    torch.cudnn_convolution_add_relu(x, w, z, 1.0, b, [1, 1], [1, 1], [1, 1], 1))


FAMILIES = ("gat", "gatv2", "graph", "bn_relu", "cutlass", "cudnn", "transformer")


def main(argv=None):
    families = list(argv if argv is not None else sys.argv[1:]) or list(FAMILIES)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        sys.exit(f"sanitizer_case.py: unknown kernel family {unknown}; choose from {', '.join(FAMILIES)}")
    if "cuda" not in _ext.compiled_backends():
        sys.exit("neptune_ext was built without CUDA kernels")
    g32, g64 = graphs("cuda")
    if "gat" in families:
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
            print(f"ok (GAT): index={g.index_dtype} H={H} C={C} {dtype} dropout={p}", flush=True)
    if "gatv2" in families:
        v2_cases = [
            (g32, 4, 32, torch.float32, 0.0, None),   # C = 32: one slot per lane and head
            (g64, 2, 64, torch.bfloat16, 0.1, 590),   # C > 32, ignored rows, dropout
            (g32, 3, 5, torch.float16, 0.0, None),    # C not a power of two
            (g32, 8, 4, torch.float64, 0.2, None),    # heads inside one lane group
        ]
        for g, H, C, dtype, p, rows in v2_cases:
            run_v2(g, H, C, dtype, p, rows)
            print(f"ok (GATv2): index={g.index_dtype} H={H} C={C} {dtype} dropout={p} rows={rows}", flush=True)
    for name, fn in (("graph", lambda: graph_family(g32)), ("bn_relu", bn_relu_family),
                     ("cutlass", cutlass_family), ("cudnn", cudnn_family)):
        if name in families:
            fn()
            print(f"ok ({name})", flush=True)
    if "transformer" in families:  # last: the families above keep their place in the log
        for g, H, C, dtype, p, ef in transformer_cases(g32, g64):
            run_transformer(g, H, C, dtype, p, ef)
            print(f"ok (transformer): index={g.index_dtype} N_src={g.num_src} N_dst={g.num_dst} "
                  f"H={H} C={C} {dtype} dropout={p} edge_feat={ef}", flush=True)


if __name__ == "__main__":
    main()
