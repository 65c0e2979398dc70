"""Graph attention benchmark: the fused op vs the PyTorch reference, the
GraphAttention layer vs PyG's GATConv, GraphAttentionV2 vs GATv2Conv and
GraphTransformer vs TransformerConv, forward + backward, on a power-law graph.

    python -m neptune_app.bench.graph_attention [--quick] [--what op,layer,gatv2,transformer]
                                                [--edge-dim D] [--json FILE]

``--edge-dim D`` gives the GraphTransformer/TransformerConv pair D edge features per edge.

Times: medians over alternated rounds in one process. Peak memory: each
contender in its own process (peak resident memory added by one fwd+bwd).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

from . import common

OP_CONTENDERS = ("op:neptune", "op:reference")
LAYER_CONTENDERS = ("layer:neptune", "layer:pyg")
GATV2_CONTENDERS = ("gatv2:neptune", "gatv2:pyg")
TRANSFORMER_CONTENDERS = ("transformer:neptune", "transformer:pyg")


def has_pyg() -> bool:
    import warnings
    try:
        with warnings.catch_warnings():  # the peer's own deprecation notices are not ours to show
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            import torch_geometric.nn  # noqa: F401
        return True
    except Exception:
        return False


def make_case(name: str, n: int, n_edges: int, heads: int, channels: int, in_channels: int,
              device: str = "cpu", dtype=torch.float32, seed: int = 0, edge_dim: int = 0):
    """Returns a closure running fwd+bwd once and returning {"forward": s, "backward": s}."""
    from neptune_ext import Graph, ops
    torch.manual_seed(seed)
    ei = common.power_law_graph(n, n_edges, seed=seed).to(device)
    if name.startswith("op:"):
        g = Graph.from_edge_index(ei, n)
        h = torch.randn(n, heads, channels, device=device, dtype=dtype, requires_grad=True)
        ss = torch.randn(n, heads, device=device, dtype=dtype, requires_grad=True)
        sd = torch.randn(n, heads, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(n, heads, channels, device=device, dtype=dtype)
        ref = name == "op:reference"

        def run():
            with common.force_reference(ref):
                out, t_f = common.timed(lambda: ops.sparse_graph_attention(h, ss, sd, g), device)
                _, t_b = common.timed(lambda: torch.autograd.grad(out, (h, ss, sd), grad), device)
            return {"forward": t_f, "backward": t_b}
        return run

    x = torch.randn(n, in_channels, device=device, dtype=dtype, requires_grad=True)
    if name == "layer:neptune":
        from neptune_ext.nn import GraphAttention
        layer = GraphAttention(in_channels, channels, heads=heads, add_self_loops=False)
    elif name == "layer:pyg":
        from torch_geometric.nn import GATConv
        layer = GATConv(in_channels, channels, heads=heads, add_self_loops=False)
    elif name == "gatv2:neptune":
        from neptune_ext.nn import GraphAttentionV2
        layer = GraphAttentionV2(in_channels, channels, heads=heads, add_self_loops=False)
    elif name == "gatv2:pyg":
        from torch_geometric.nn import GATv2Conv
        layer = GATv2Conv(in_channels, channels, heads=heads, add_self_loops=False)
    elif name in TRANSFORMER_CONTENDERS:
        if name == "transformer:neptune":
            from neptune_ext.nn import GraphTransformer as cls
        else:
            from torch_geometric.nn import TransformerConv as cls
        layer = cls(in_channels, channels, heads=heads, edge_dim=edge_dim or None)
    else:
        raise ValueError(f"unknown contender {name!r}")
    layer = layer.to(device=device, dtype=dtype)
    grad = torch.randn(n, heads * channels, device=device, dtype=dtype)
    params = [x] + list(layer.parameters())
    extra = ()
    if name in TRANSFORMER_CONTENDERS and edge_dim:
        extra = (torch.randn(ei.shape[1], edge_dim, device=device, dtype=dtype),)

    def run():
        out, t_f = common.timed(lambda: layer(x, ei, *extra), device)
        _, t_b = common.timed(lambda: torch.autograd.grad(out, params, grad), device)
        return {"forward": t_f, "backward": t_b}
    return run


def _memory_main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("--nodes", type=int)
    p.add_argument("--edges", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--channels", type=int)
    p.add_argument("--in-channels", type=int)
    p.add_argument("--edge-dim", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("NEPTUNE_BENCH_THREADS", torch.get_num_threads())))
    run = make_case(a.name, a.nodes, a.edges, a.heads, a.channels, a.in_channels, edge_dim=a.edge_dim)
    run()  # warm-up: one-time graph preparation (cached by both sides' usage) is not counted
    peak = common.cpu_peak_extra_bytes(run)
    print(json.dumps({"peak_extra_bytes": peak}))


def run_benchmark(nodes=100_000, edges=1_000_000, heads=4, channels=32, in_channels=128,
                  repeats=5, what=("op", "layer"), device="cpu", memory=True, out=sys.stdout,
                  edge_dim=0):
    names = []
    if "op" in what:
        names += list(OP_CONTENDERS)
    if "layer" in what:
        names += ["layer:neptune"] + (["layer:pyg"] if has_pyg() else [])
    if "gatv2" in what:
        names += ["gatv2:neptune"] + (["gatv2:pyg"] if has_pyg() else [])
    if "transformer" in what:
        names += ["transformer:neptune"] + (["transformer:pyg"] if has_pyg() else [])
    print(f"graph attention: power-law graph N={nodes:,} E={edges:,}, H={heads}, C={channels}, "
          f"in_channels={in_channels} (layer), edge_dim={edge_dim or None} (transformer), {device}: "
          f"{common.machine()}", file=out)
    t0 = time.perf_counter()
    runs = {n: make_case(n, nodes, edges, heads, channels, in_channels, device, edge_dim=edge_dim)
            for n in names}
    times = common.alternate(runs, repeats)
    del runs
    mem = {}
    if memory and device == "cpu":
        for n in names:
            print(f"  measuring peak memory of {n} in its own process", file=sys.stderr, flush=True)
            r = common.run_isolated("neptune_app.bench.graph_attention",
                                    ["--_memory", n, "--nodes", str(nodes), "--edges", str(edges),
                                     "--heads", str(heads), "--channels", str(channels),
                                     "--in-channels", str(in_channels), "--edge-dim", str(edge_dim)])
            mem[n] = r.get("peak_extra_bytes", r.get("error"))
    results = {}
    for n in names:
        f, b = common.median_ms(times[n]["forward"]), common.median_ms(times[n]["backward"])
        tot = [a + c for a, c in zip(times[n]["forward"], times[n]["backward"])]
        results[n] = {"forward_ms": f, "backward_ms": b, "total_ms": common.median_ms(tot),
                      "total_ms_range": [1e3 * min(tot), 1e3 * max(tot)],
                      "peak_extra_bytes": mem.get(n)}
    peers = {"op:neptune": "op:reference", "layer:neptune": "layer:pyg", "gatv2:neptune": "gatv2:pyg",
             "transformer:neptune": "transformer:pyg"}
    for n, p in peers.items():
        if n in results and p in results:
            # Speedup per alternated round (same round, same machine state): median and range.
            ratios = [(tp[0] + tp[1]) / (to[0] + to[1]) for to, tp in zip(
                zip(times[n]["forward"], times[n]["backward"]),
                zip(times[p]["forward"], times[p]["backward"]))]
            results[n]["speedup_vs_peer"] = {"median": statistics.median(ratios),
                                             "min": min(ratios), "max": max(ratios)}
    rows = []
    for n in names:
        r = results[n]
        peer = results.get(peers.get(n, ""), None)
        sp = r.get("speedup_vs_peer")
        speed = f"{sp['median']:.2f}x ({sp['min']:.2f}-{sp['max']:.2f})" if sp else ""
        memr = ""
        if peer and isinstance(r["peak_extra_bytes"], int) and isinstance(peer["peak_extra_bytes"], int) \
                and peer["peak_extra_bytes"] > 0:
            memr = f"{r['peak_extra_bytes'] / peer['peak_extra_bytes']:.2f}"
        lo, hi = r["total_ms_range"]
        rows.append([n, f"{r['forward_ms']:.1f}", f"{r['backward_ms']:.1f}",
                     f"{r['total_ms']:.1f} ({lo:.0f}-{hi:.0f})",
                     speed, common.fmt_bytes(r["peak_extra_bytes"]), memr])
    common.print_table(rows, ["contender", "fwd ms", "bwd ms", "fwd+bwd ms (range)", "speedup vs peer (range)",
                              "peak extra mem", "mem vs peer"], file=out)
    print(f"(medians of {repeats} alternated rounds, speedups per round; peers: op:reference, layer:pyg, "
          f"gatv2:pyg, transformer:pyg; "
          f"{time.perf_counter() - t0:.0f} s)", file=out)
    return {"benchmark": "graph_attention", "device": device, "machine": common.machine(),
            "torch": torch.__version__, "commit": common.git_commit(),
            "config": dict(nodes=nodes, edges=edges, heads=heads, channels=channels,
                           in_channels=in_channels, repeats=repeats, edge_dim=edge_dim or None),
            "results": results}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_memory"]:
        return _memory_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="a smaller graph and fewer rounds")
    p.add_argument("--nodes", type=int, default=100_000)
    p.add_argument("--edges", type=int, default=1_000_000)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--in-channels", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--what", default="op,layer", help="comma list of: op, layer, gatv2, transformer")
    p.add_argument("--edge-dim", type=int, default=0, help="edge features (transformer pair)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-process memory runs")
    p.add_argument("--json", help="write the figures to this file")
    a = p.parse_args(argv)
    if a.device == "cuda":
        from . import gpu_graph_attention
        return gpu_graph_attention.main([x for x in argv if x not in ("--device", "cuda")])
    if a.quick:
        a.nodes, a.edges, a.repeats = min(a.nodes, 20_000), min(a.edges, 200_000), min(a.repeats, 3)
    res = run_benchmark(a.nodes, a.edges, a.heads, a.channels, a.in_channels, a.repeats,
                        tuple(a.what.split(",")), a.device, not a.no_memory, edge_dim=a.edge_dim)
    common.write_json(a.json, res)
    return res


if __name__ == "__main__":
    main()
