"""GPU benchmark of sparse graph attention, forward + backward.

    python benchmarks/gpu_graph_attention.py [--quick] [--json FILE] [--graphs arxiv,products]
                                             [--what op,layer,gatv2,transformer] [--edge-dim D]
    python benchmarks/bench_graph_attention.py --device cuda ...   (calls main(argv) here)
    neptune bench --device cuda

On synthetic power-law graphs with the sizes of ogbn-arxiv (169,343 nodes,
1,166,243 edges) and ogbn-products (2,449,029 nodes, 61,859,140 edges), H=4, C=64,
in fp32 and bf16, it measures
  * layer:neptune  neptune_ext.nn.GraphAttention (projection + scores + fused op)
                   if it exists, else the same path written out by hand;
  * layer:pyg      torch_geometric.nn.GATConv (same shapes, add_self_loops=False);
  * op:neptune     the bare fused op on given h / scores;
  * op:reference   the pure-PyTorch reference of the op;
  * gatv2:neptune / gatv2:pyg   GraphAttentionV2 / GATv2Conv;
  * transformer:neptune         neptune_ext.nn.GraphTransformer (--what transformer);
  * transformer:pyg             torch_geometric.nn.TransformerConv, same weights;
  * transformer:pyg_compiled    torch.compile(TransformerConv) (dynamic=False; compiled by
                   one untimed step, recorded as compile_seconds; only on graphs of at most
                   --compile-max-edges edges, default 2M: the arxiv-sized one; run after
                   every eager contender of every graph);
each for: forward and backward time (CUDA events around each, after warm-up; the
median of the repeats), and peak memory (torch.cuda.max_memory_allocated after a
reset, minus what was allocated before the step; each contender on its own, with
the others freed). A contender that runs out of memory is recorded as "OOM".
Each contender with a peer gets speedup_vs / memory_vs (the peer's fwd+bwd time / its own;
its peak / the peer's) in the JSON, which is rewritten after every contender (a run cut
short keeps what it measured; "complete" is true once the run ended).

The graph-transformer pair keeps its weights in fp32: its "bf16" rows run the forward under
torch.autocast(bfloat16), as users train it (the other layers' bf16 rows are bf16 modules).
Without --edge-dim there are no edge features (with them, on the products-sized graph every
contender holds E x H x C projected edge features: 63 GB in fp32).

Forward bandwidth of the bare op (no autograd) is counted on the bytes it must
move: the gathered source rows E*H*C*elem, the per-edge source scores E*H*elem
(and edge logits when given), the indices (rowptr, col), the destination scores,
and the output (N*H*C*elem + lse N*H*4) - against the device-to-device copy
bandwidth measured here (a torch copy of a 2 GiB buffer, bytes read + written).
"""
import argparse
import json
import statistics
import sys
import time

import torch

from .. import _io
from .common import force_reference, git_commit, write_json
from .gpu_timing import copy_bandwidth, free, is_oom, peak_bytes, time_fwd_bwd, time_ms  # noqa: F401

GRAPHS = {  # name: (nodes, edges), the sizes of the OGB node-property graphs
    "arxiv": (169_343, 1_166_243),
    "products": (2_449_029, 61_859_140),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TRANSFORMER = ("transformer:neptune", "transformer:pyg", "transformer:pyg_compiled")
PYG = ("layer:pyg", "gatv2:pyg", "transformer:pyg", "transformer:pyg_compiled")
# Each contender's peers (speedup_vs / memory_vs, the table's "vs peer" columns).
PEERS = {"op:neptune": ("op:reference",), "layer:neptune": ("layer:pyg",),
         "gatv2:neptune": ("gatv2:pyg",),
         "transformer:neptune": ("transformer:pyg", "transformer:pyg_compiled")}


def contender_names(what):
    """The contenders of a --what list (comma separated: op, layer, gatv2, transformer)."""
    parts = what.split(",")
    unknown = [w for w in parts if w not in ("op", "layer", "gatv2", "transformer")]
    if unknown:
        raise ValueError(f"--what: unknown {unknown} (choose from op, layer, gatv2, transformer)")
    names = []
    if "op" in parts:
        names += ["op:neptune", "op:reference"]
    if "layer" in parts:
        names += ["layer:neptune", "layer:pyg"]
    if "gatv2" in parts:
        names += ["gatv2:neptune", "gatv2:pyg"]
    if "transformer" in parts:
        names += list(TRANSFORMER)
    return names


# ---------------------------------------------------------------- inputs

def power_law_edges(n, n_edges, alpha_dst, alpha_src, seed, device):
    """[2, E] int64: destinations and sources drawn from Zipf-like laws (weight of the
    k-th node ~ k^-alpha, node order shuffled), so both in- and out-degrees have hubs."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    ranks = torch.arange(1, n + 1, device=device, dtype=torch.float64)

    def draw(alpha):
        cdf = torch.cumsum(ranks.pow(-alpha), 0)
        cdf /= cdf[-1].clone()
        out = torch.empty(n_edges, dtype=torch.int64, device=device)
        step = 1 << 24
        for s in range(0, n_edges, step):  # bounded temporaries
            u = torch.rand(min(step, n_edges - s), device=device, dtype=torch.float64, generator=gen)
            out[s:s + step] = torch.searchsorted(cdf, u).clamp_max_(n - 1)
        perm = torch.randperm(n, device=device, generator=gen)
        return perm[out]

    return torch.stack([draw(alpha_src), draw(alpha_dst)])


def degree_stats(ei, n):
    deg_in = torch.bincount(ei[1], minlength=n)
    deg_out = torch.bincount(ei[0], minlength=n)
    return {"max_in_degree": int(deg_in.max()), "max_out_degree": int(deg_out.max()),
            "empty_destinations": int((deg_in == 0).sum())}


# ---------------------------------------------------------------- contenders

def neptune_layer_class():
    try:
        import neptune_ext.nn as nnx
    except Exception:
        return None
    return getattr(nnx, "GraphAttention", None)


def make_layer(name, ei, n, in_ch, H, C, dtype):
    """Returns (forward closure, leaves whose .grad to clear, output gradient)."""
    x = torch.randn(n, in_ch, device="cuda", dtype=dtype, requires_grad=True)
    if name in ("gatv2:neptune", "gatv2:pyg"):
        if name == "gatv2:pyg":
            from torch_geometric.nn import GATv2Conv as cls
        else:
            from neptune_ext.nn import GraphAttentionV2 as cls
        layer = cls(in_ch, C, heads=H, add_self_loops=False).to("cuda", dtype)
        grad = torch.randn(n, H * C, device="cuda", dtype=dtype)
        return (lambda: layer(x, ei)), [x] + list(layer.parameters()), grad
    if name == "layer:pyg":
        from torch_geometric.nn import GATConv
        layer = GATConv(in_ch, C, heads=H, add_self_loops=False).to("cuda", dtype)
        fwd = lambda: layer(x, ei)  # noqa: E731
    else:
        cls = neptune_layer_class()
        if cls is not None:
            layer = cls(in_ch, C, heads=H, add_self_loops=False).to("cuda", dtype)
            fwd = lambda: layer(x, ei)  # noqa: E731
        else:  # the layer written out: projection, the two score halves, the fused op
            from neptune_ext import Graph, ops
            g = Graph.from_edge_index(ei, n)
            g.csc()
            layer = torch.nn.ModuleDict({"lin": torch.nn.Linear(in_ch, H * C, bias=False)})
            layer.att_src = torch.nn.Parameter(torch.randn(1, H, C) * C ** -0.5)
            layer.att_dst = torch.nn.Parameter(torch.randn(1, H, C) * C ** -0.5)
            layer.bias = torch.nn.Parameter(torch.zeros(H * C))
            layer = layer.to("cuda", dtype)

            def fwd():
                h = layer["lin"](x).view(n, H, C)
                ss = (h * layer.att_src).sum(-1)
                sd = (h * layer.att_dst).sum(-1)
                return ops.sparse_graph_attention(h, ss, sd, g, 0.2).reshape(n, H * C) + layer.bias
    grad = torch.randn(n, H * C, device="cuda", dtype=dtype)
    return fwd, [x] + list(layer.parameters()), grad


def transformer_layer(name, in_ch, H, C, edge_dim=0, device="cuda", compile_backend="inductor"):
    """GraphTransformer or TransformerConv (or torch.compile of it) with the same weights for
    every contender (the two share parameter names): drawn from a fixed CPU generator."""
    if name == "transformer:neptune":
        from neptune_ext.nn import GraphTransformer as cls
    elif name in ("transformer:pyg", "transformer:pyg_compiled"):
        from torch_geometric.nn import TransformerConv as cls
    else:
        raise ValueError(f"unknown graph-transformer contender {name!r}")
    layer = cls(in_ch, C, heads=H, edge_dim=edge_dim or None)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, prm in sorted(layer.named_parameters()):
            scale = prm.shape[-1] ** -0.5 if prm.dim() > 1 else 0.1
            prm.copy_(torch.randn(prm.shape, generator=gen) * scale)
    layer = layer.to(device)
    if name == "transformer:pyg_compiled":
        return layer, torch.compile(layer, dynamic=False, backend=compile_backend)
    return layer, layer


def make_transformer(name, ei, n, in_ch, H, C, amp=None, edge_dim=0, device="cuda",
                     compile_backend="inductor"):
    """(forward closure, leaves whose .grad to clear, output gradient) for a graph-transformer
    contender: fp32 weights and input, the forward under autocast to ``amp`` when given."""
    module, layer = transformer_layer(name, in_ch, H, C, edge_dim, device, compile_backend)
    x = torch.randn(n, in_ch, device=device, requires_grad=True)
    ea = torch.randn(ei.shape[1], edge_dim, device=device) if edge_dim else None
    grad = torch.randn(n, H * C, device=device, dtype=amp or torch.float32)
    dev_type = torch.device(device).type

    def fwd():
        with torch.autocast(dev_type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            out = layer(x, ei, ea)
        return out if out.dtype == grad.dtype else out.to(grad.dtype)
    return fwd, [x] + list(module.parameters()), grad


def make_op(name, ei, n, H, C, dtype):
    from neptune_ext import Graph, ops
    g = Graph.from_edge_index(ei, n)
    g.csc()
    h = torch.randn(n, H, C, device="cuda", dtype=dtype, requires_grad=True)
    ss = torch.randn(n, H, device="cuda", dtype=dtype, requires_grad=True)
    sd = torch.randn(n, H, device="cuda", dtype=dtype, requires_grad=True)
    grad = torch.randn(n, H, C, device="cuda", dtype=dtype)
    reference = name == "op:reference"

    def fwd():
        with force_reference(reference):
            return ops.sparse_graph_attention(h, ss, sd, g, 0.2)
    return fwd, [h, ss, sd], grad, g


def forward_bytes(g, n, H, C, dtype):
    """Bytes the forward op must move at least (see the module docstring)."""
    E = g.num_edges
    elem = torch.empty((), dtype=dtype).element_size()
    idx = g.col.element_size()
    gathered = E * H * C * elem
    return {
        "gathered_rows": gathered,
        "total": gathered + E * H * elem + (E + n + 1) * idx + n * H * elem + n * H * C * elem + n * H * 4,
    }


def run_contender(name, ei, n, in_ch, H, C, dtype, warmup, repeats, copy_bw, edge_dim=0):
    rec = {}
    try:
        if name in TRANSFORMER:
            amp = None if dtype == torch.float32 else dtype
            fwd, leaves, grad = make_transformer(name, ei, n, in_ch, H, C, amp, edge_dim)
            g = None
            rec["precision"] = "fp32" if amp is None else f"{str(amp).split('.')[-1]} autocast"
            if name == "transformer:pyg_compiled":  # the compile: one untimed step
                t0 = time.perf_counter()
                fwd().backward(grad)
                torch.cuda.synchronize()
                rec["compile_seconds"] = time.perf_counter() - t0
        elif name.startswith(("layer:", "gatv2:")):
            fwd, leaves, grad = make_layer(name, ei, n, in_ch, H, C, dtype)
            g = None
        else:
            fwd, leaves, grad, g = make_op(name, ei, n, H, C, dtype)
        f, b, tot = time_fwd_bwd(fwd, leaves, grad, warmup, repeats)
        rec.update(forward_ms=f, backward_ms=b, total_ms=statistics.median(tot))
        rec["peak_bytes"] = peak_bytes(fwd, leaves, grad)
        if name == "op:neptune":
            with torch.no_grad():
                ms = time_ms(fwd, warmup, repeats)
            nbytes = forward_bytes(g, n, H, C, dtype)
            bw = nbytes["total"] / (ms * 1e-3)
            rec.update(forward_nograd_ms=ms, forward_bytes=nbytes, forward_bandwidth_gbs=bw / 1e9,
                       forward_fraction_of_copy=bw / copy_bw)
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        if is_oom(exc):
            rec = {"result": "OOM"}
        else:
            rec = {"result": "error", "error": f"{type(exc).__name__}: {exc}"[:500]}
    finally:
        fwd = leaves = grad = g = None  # noqa: F841
        if name == "transformer:pyg_compiled":
            torch._dynamo.reset()  # drop the compiled module (and what it holds)
        free()
    return rec


def add_peer_ratios(contenders):
    """speedup_vs[peer] = the peer's total_ms / this one's ("peer OOM" when the peer ran out of
    memory), memory_vs[peer] = this one's peak / the peer's; peers named without their prefix."""
    for name, peers in PEERS.items():
        r = contenders.get(name)
        if not r or "total_ms" not in r:
            continue
        for peer in peers:
            q = contenders.get(peer, {})
            key = peer.split(":", 1)[1]
            if "total_ms" in q:
                r.setdefault("speedup_vs", {})[key] = q["total_ms"] / r["total_ms"]
            elif q.get("result") == "OOM":
                r.setdefault("speedup_vs", {})[key] = "peer OOM"
            if r.get("peak_bytes") and q.get("peak_bytes"):
                r.setdefault("memory_vs", {})[key] = r["peak_bytes"] / q["peak_bytes"]


# ---------------------------------------------------------------- report

def fmt_ms(r, key):
    return f"{r[key]:.2f}" if key in r else r.get("result", "-")


def fmt_gib(r):
    return f"{r['peak_bytes'] / 2**30:.2f}" if "peak_bytes" in r else r.get("result", "-")


def print_table(results):
    head = ["graph", "dtype", "contender", "fwd ms", "bwd ms", "fwd+bwd ms", "vs peer", "peak GiB",
            "mem vs peer", "fwd % copy bw"]
    rows = []
    for key, res in results.items():
        graph, dt = key.split("/")
        for name, r in res["contenders"].items():
            speed = " / ".join(v if isinstance(v, str) else f"{v:.2f}x"
                               for v in r.get("speedup_vs", {}).values())
            mem = " / ".join(f"{v:.2f}" for v in r.get("memory_vs", {}).values())
            frac = f"{100 * r['forward_fraction_of_copy']:.0f}%" if "forward_fraction_of_copy" in r else ""
            rows.append([graph, dt, name, fmt_ms(r, "forward_ms"), fmt_ms(r, "backward_ms"),
                         fmt_ms(r, "total_ms"), speed, fmt_gib(r), mem, frac])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for row in [head] + rows:
        print("  ".join(str(x).rjust(w) if i >= 3 else str(x).ljust(w)
                        for i, (x, w) in enumerate(zip(row, widths))))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--graphs", default="arxiv,products", help="comma list of: " + ", ".join(GRAPHS))
    p.add_argument("--nodes", type=int, help="a custom graph instead of --graphs (with --edges)")
    p.add_argument("--edges", type=int)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--in-channels", type=int, default=128)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--what", default="op,layer,gatv2", help="comma list of: op, layer, gatv2, transformer")
    p.add_argument("--edge-dim", type=int, default=0, help="edge features (transformer contenders)")
    p.add_argument("--compile-max-edges", type=int, default=2_000_000,
                   help="torch.compile(TransformerConv) only on graphs of at most this many edges")
    p.add_argument("--alpha-dst", type=float, default=0.6, help="Zipf exponent of the in-degrees")
    p.add_argument("--alpha-src", type=float, default=0.5, help="Zipf exponent of the out-degrees")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="graphs 10x smaller, fewer repeats")
    p.add_argument("--json", help="write every figure to this file")
    a, unknown = p.parse_known_args(argv)
    if unknown:
        print(f"gpu_graph_attention: ignoring {unknown}", file=sys.stderr)
    if not torch.cuda.is_available():
        sys.exit("gpu_graph_attention: no CUDA device")

    import neptune_ext
    backends = sorted(neptune_ext.backend.compiled_backends())
    if "cuda" not in backends:
        print("WARNING: neptune_ext has no CUDA kernels (compiled backends: "
              f"{backends}); op:neptune / layer:neptune run the reference", file=sys.stderr)

    if a.nodes and a.edges:
        graphs = {f"custom{a.nodes}x{a.edges}": (a.nodes, a.edges)}
    else:
        graphs = {k: GRAPHS[k] for k in a.graphs.split(",")}
    if a.quick:
        graphs = {k: (max(1000, n // 10), max(10_000, e // 10)) for k, (n, e) in graphs.items()}
        a.repeats, a.warmup = min(a.repeats, 3), min(a.warmup, 1)
    try:
        names = contender_names(a.what)
    except ValueError as exc:
        p.error(str(exc))
    try:
        import torch_geometric  # noqa: F401
        has_pyg = True
    except Exception:
        has_pyg = False

    H, C = a.heads, a.channels
    dev = torch.cuda.get_device_properties(0)
    copy_bw = copy_bandwidth()
    report = {
        "benchmark": "gpu_graph_attention", "device": torch.cuda.get_device_name(0),
        "multiprocessors": dev.multi_processor_count, "memory_bytes": dev.total_memory,
        "torch": torch.__version__, "cuda": torch.version.cuda, "commit": git_commit(),
        "neptune_build": neptune_ext._ext._build_info() if hasattr(neptune_ext._ext, "_build_info") else {},
        "neptune_layer": "neptune_ext.nn.GraphAttention" if neptune_layer_class() else "hand-written",
        "config": {"heads": H, "channels": C, "in_channels": a.in_channels, "warmup": a.warmup,
                   "repeats": a.repeats, "alpha_dst": a.alpha_dst, "alpha_src": a.alpha_src,
                   "graphs": graphs, "quick": a.quick, "what": a.what, "edge_dim": a.edge_dim,
                   "compile_max_edges": a.compile_max_edges},
        "copy_bandwidth_gbs": copy_bw / 1e9,
        "results": {},
        "complete": False,
    }
    print(f"{report['device']}: copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write); "
          f"H={H}, C={C}, in_channels={a.in_channels}; layer:neptune = {report['neptune_layer']}",
          flush=True)
    t0 = time.perf_counter()
    # torch.compile last (a second pass over the graphs): every eager figure is measured (and
    # written) before the compiles, whose time is the least predictable.
    passes = [[x for x in names if x != "transformer:pyg_compiled"]]
    if "transformer:pyg_compiled" in names:
        passes.append(["transformer:pyg_compiled"])
    for i, pass_names in enumerate(passes):
        for gname, (n, E) in graphs.items():
            if i > 0 and (E > a.compile_max_edges or not has_pyg):
                why = ({"result": "torch_geometric not installed"} if not has_pyg else
                       {"result": "skipped", "why": f"E > --compile-max-edges {a.compile_max_edges}"})
                for dname in a.dtypes.split(","):
                    report["results"][f"{gname}/{dname}"]["contenders"]["transformer:pyg_compiled"] = why
                continue
            # seeded: the second pass draws the same graph
            ei = power_law_edges(n, E, a.alpha_dst, a.alpha_src, seed=0, device="cuda")
            stats = degree_stats(ei, n)
            if i == 0:
                print(f"{gname}: N={n:,} E={E:,} {stats}", flush=True)
            for dname in a.dtypes.split(","):
                dtype = DTYPES[dname]
                res = report["results"].setdefault(f"{gname}/{dname}",
                                                   {"nodes": n, "edges": E, **stats, "contenders": {}})
                for name in pass_names:
                    if name in PYG and not has_pyg:
                        res["contenders"][name] = {"result": "torch_geometric not installed"}
                        continue
                    r = run_contender(name, ei, n, a.in_channels, H, C, dtype, a.warmup, a.repeats,
                                      copy_bw, a.edge_dim)
                    res["contenders"][name] = r
                    add_peer_ratios(res["contenders"])
                    print(f"  {gname} {dname} {name}: {json.dumps(r)}", flush=True)
                    if a.json:  # after every contender: a run cut short keeps what it measured
                        report["seconds"] = time.perf_counter() - t0
                        _io.write_json(a.json, report)
            del ei
            free()
    report["seconds"] = time.perf_counter() - t0
    report["complete"] = True
    print()
    print_table(report["results"])
    print(f"(medians of {a.repeats} runs after {a.warmup} warm-up; peak = max_memory_allocated "
          "growth over one fwd+bwd; fwd % copy bw: bare op, no autograd; vs peer: op:neptune vs "
          "op:reference, layer:neptune vs layer:pyg, gatv2:neptune vs gatv2:pyg, "
          "transformer:neptune vs transformer:pyg / transformer:pyg_compiled)")
    write_json(a.json, report)
    return report


if __name__ == "__main__":
    main()
