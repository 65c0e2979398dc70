"""GraphAttention (or GraphAttentionV2) where users train: small static graphs and sampled
mini-batches, forward + backward per step, against PyG's GATConv (GATv2Conv) eager and compiled
(torch.compile), on CPU or CUDA.

    python -m neptune_app.bench.user_graphs [--cases cora,pubmed,minibatch] [--device cuda]
                                            [--layer gatv2] [--amp bf16] [--rounds 9] [--json FILE]

Cases (random graphs with the sizes of the named data sets):
  cora       N=2,708   E=10,556   in=1,433, 8 heads x 8, the same edge_index every step
  pubmed     N=19,717  E=88,648   in=500,   8 heads x 8, the same edge_index every step
  minibatch  N=60,000  E=400,000  in=128,   4 heads x 64, a NEW edge_index every step (what a
             neighbour loader hands out), drawn from a pool of 8 so every contender sees the same
             graphs
Contenders, alternated round by round (ABC, ABC, ...): neptune_ext's layer, PyG's (same weights),
and torch.compile of PyG's (dynamic shapes for the mini-batches; compiled before timing). Times
are medians; speedups are taken per round. Both layers use PyG's self-loop handling
(add_self_loops=True), PyG's default.
"""
import argparse
import statistics
import sys
import time

import torch

from . import common

CASES = {
    "cora": dict(n=2708, e=10556, fin=1433, heads=8, ch=8, fresh=False),
    "pubmed": dict(n=19717, e=88648, fin=500, heads=8, ch=8, fresh=False),
    "minibatch": dict(n=60_000, e=400_000, fin=128, heads=4, ch=64, fresh=True),
}


def _graphs(case, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    pool = 8 if case["fresh"] else 1
    return [torch.randint(0, case["n"], (2, case["e"]), generator=g).to(device) for _ in range(pool)]


def _step_fn(layer, x, graphs, device, amp):
    state = {"i": 0}

    def run():
        ei = graphs[state["i"] % len(graphs)]
        state["i"] += 1
        if len(graphs) > 1:
            ei = ei.clone()  # a fresh tensor object: no cache can hold it
        common.sync(device)
        t = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp == "bf16"):
            out = layer(x, ei)
        out.float().sum().backward()
        common.sync(device)
        return {"step": time.perf_counter() - t}
    return run


LAYERS = ("gat", "gatv2")


def _classes(layer):
    from torch_geometric.nn import GATConv, GATv2Conv

    from neptune_ext.nn import GraphAttention, GraphAttentionV2
    return {"gat": (GraphAttention, GATConv), "gatv2": (GraphAttentionV2, GATv2Conv)}[layer]


def run_case(name, device="cpu", amp=None, rounds=9, compiled=True, out=sys.stdout, layer="gat"):
    ours_cls, pyg_cls = _classes(layer)
    case = CASES[name]
    torch.manual_seed(0)
    x = torch.randn(case["n"], case["fin"], device=device)  # input features: no gradient
    graphs = _graphs(case, device)
    ours = ours_cls(case["fin"], case["ch"], heads=case["heads"]).to(device)
    pyg = pyg_cls(case["fin"], case["ch"], heads=case["heads"]).to(device)
    pyg.load_state_dict(ours.state_dict())
    contenders = {"neptune_ext": _step_fn(ours, x, graphs, device, amp),
                  "pyg": _step_fn(pyg, x, graphs, device, amp)}
    compile_s = None
    if compiled:
        pyg_c = pyg_cls(case["fin"], case["ch"], heads=case["heads"]).to(device)
        pyg_c.load_state_dict(ours.state_dict())
        fn = torch.compile(pyg_c, dynamic=case["fresh"])
        print(f"  {name}: compiling {pyg_cls.__name__} (torch.compile) ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        step = _step_fn(fn, x, graphs, device, amp)
        for _ in range(2):
            step()
        compile_s = time.perf_counter() - t
        contenders["pyg_compiled"] = step
    times = {k: v["step"] for k, v in common.alternate(contenders, rounds, warmup=2, progress=False).items()}
    res = {"case": name, "layer": layer, **case, "device": device, "amp": amp, "rounds": rounds,
           "compile_seconds": compile_s,
           "median_ms": {k: common.median_ms(v) for k, v in times.items()},
           "rounds_ms": {k: [1e3 * s for s in v] for k, v in times.items()}}
    for peer in [k for k in times if k != "neptune_ext"]:
        ratios = [p / o for p, o in zip(times[peer], times["neptune_ext"])]
        res[f"speedup_vs_{peer}"] = {"median": statistics.median(ratios), "min": min(ratios),
                                     "max": max(ratios)}
    m = res["median_ms"]
    line = f"{layer + ' ' if layer != 'gat' else ''}{name:9s} {device}{'/' + amp if amp else ''}: ours {m['neptune_ext']:.1f} ms, PyG {m['pyg']:.1f} ms " \
           f"({res['speedup_vs_pyg']['median']:.2f}x)"
    if "pyg_compiled" in m:
        line += f", compiled PyG {m['pyg_compiled']:.1f} ms ({res['speedup_vs_pyg_compiled']['median']:.2f}x)"
    print(line, file=out, flush=True)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="cora,pubmed,minibatch")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--amp", choices=["bf16"], help="run the steps under bf16 autocast")
    p.add_argument("--layer", default="gat", choices=LAYERS,
                   help="gat: GraphAttention against GATConv; gatv2: GraphAttentionV2 against GATv2Conv")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    p.add_argument("--json")
    a = p.parse_args(argv)
    for c in a.cases.split(","):
        if c not in CASES:
            p.error(f"unknown case {c!r} (choose from {', '.join(CASES)})")
    name = _classes(a.layer)[0].__name__
    print(f"{name} per step (fwd+bwd) on user-sized graphs, {a.device}: {common.machine()}", flush=True)
    report = {"benchmark": "user_graphs", "layer": a.layer, "machine": common.machine(),
              "torch": torch.__version__, "commit": common.git_commit(),
              "threads": torch.get_num_threads(), "results": []}
    for c in a.cases.split(","):
        report["results"].append(run_case(c, a.device, a.amp, a.rounds, not a.no_compile, layer=a.layer))
    common.write_json(a.json, report)
    return report


if __name__ == "__main__":
    main()
