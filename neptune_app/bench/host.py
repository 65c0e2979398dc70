"""Host cost of an attention layer's training step: microseconds and ATen/neptune op calls
per forward + backward, ours next to PyG's, on one CPU thread.

On small graphs and sampled mini-batches the math takes microseconds and the host decides
the speed: every op call is a dispatch (and on a GPU, a launch). Cases: a tiny graph (32
nodes), a Cora-sized one, and a mini-batch-sized graph with a fresh ``edge_index`` every
step (the sampled-training path: the graph is built each step). The graph is otherwise
cached (the same ``edge_index`` tensor every step), as in full-batch training.

    python -m neptune_app.bench.host [--json benchmarks/results/cpu-<date>-host.json]
"""
import argparse
import datetime
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import common

CASES = {
    # name: (nodes, edges, in_channels, heads, channels, a fresh edge_index each step)
    "tiny": (32, 128, 16, 2, 8, False),
    "cora-sized": (2708, 10556, 1433, 8, 8, False),
    "minibatch-fresh": (1000, 10000, 64, 4, 16, True),
}


class _CountOps(TorchDispatchMode):
    """Counts every op that reaches the dispatcher below autograd (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


KINDS = ("gat", "gatv2", "transformer")


def _layers(kind):
    from neptune_ext.nn import GraphAttention, GraphAttentionV2, GraphTransformer
    ours = {"gat": GraphAttention, "gatv2": GraphAttentionV2, "transformer": GraphTransformer}[kind]
    theirs = None
    try:
        from torch_geometric.nn import GATConv, GATv2Conv, TransformerConv
        theirs = {"gat": GATConv, "gatv2": GATv2Conv, "transformer": TransformerConv}[kind]
    except Exception:  # PyG is optional: ours alone
        pass
    return ours, theirs


def _step_fn(layer, x, edges, fresh):
    """One forward + backward; with ``fresh`` a new edge_index tensor every call."""
    it = iter(range(1 << 62))

    def step():
        ei = edges[next(it) % len(edges)].clone() if fresh else edges[0]
        layer.zero_grad(set_to_none=True)
        layer(x, ei).sum().backward()
    return step


def run_host(cases=None, kinds=KINDS, repeats=7, threads=1, min_seconds=0.05):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_host(cases, kinds, repeats, min_seconds)
    finally:
        torch.set_num_threads(before)


def _run_host(cases, kinds, repeats, min_seconds):
    results = {}
    for case in cases or CASES:
        n, e, f, heads, ch, fresh = CASES[case]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, f, generator=g)
        edges = [torch.randint(0, n, (2, e), generator=g) for _ in range(4 if fresh else 1)]
        for kind in kinds:
            ours_cls, theirs_cls = _layers(kind)
            contenders = {"ours": ours_cls(f, ch, heads=heads)}
            if theirs_cls is not None:
                contenders["PyG"] = theirs_cls(f, ch, heads=heads)
            steps = {name: _step_fn(m, x, edges, fresh) for name, m in contenders.items()}
            ops = {}
            for name, step in steps.items():
                step()  # warm the cache (the graph, lazy init)
                with _CountOps() as counter:
                    step()
                ops[name] = sum(counter.calls.values())
            # steps per timed round: enough to last min_seconds
            t0 = time.perf_counter()
            steps["ours"]()
            per = max(1, int(min_seconds / max(time.perf_counter() - t0, 1e-6)))

            def timed(step):
                def run():
                    t = time.perf_counter()
                    for _ in range(per):
                        step()
                    return {"step": (time.perf_counter() - t) / per}
                return run
            times = common.alternate({k: timed(s) for k, s in steps.items()}, repeats, progress=False)
            row = {name: {"us": 1e3 * common.median_ms(times[name]["step"]), "op_calls": ops[name]}
                   for name in steps}
            if "PyG" in row:
                row["speedup"] = row["PyG"]["us"] / row["ours"]["us"]
                row["op_call_ratio"] = row["ours"]["op_calls"] / row["PyG"]["op_calls"]
            results[f"{kind} / {case}"] = row
            _print_row(f"{kind} / {case}", row)
    return results


def _print_row(name, row):
    o = row["ours"]
    if "PyG" in row:
        p = row["PyG"]
        print(f"{name:40s} PyG {p['us']:9.0f} us {p['op_calls']:5d} ops | ours {o['us']:9.0f} us "
              f"{o['op_calls']:5d} ops | {row['speedup']:.2f}x, {row['op_call_ratio']:.2f} of the op calls",
              flush=True)
    else:
        print(f"{name:40s} ours {o['us']:9.0f} us {o['op_calls']:5d} ops", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help="comma list of: " + ", ".join(CASES))
    p.add_argument("--kinds", default=",".join(KINDS), help="comma list of: " + ", ".join(KINDS))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in cases:
        if c not in CASES:
            p.error(f"--cases: unknown case {c!r}; choose from {', '.join(CASES)}")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    for k in kinds:
        if k not in KINDS:
            p.error(f"--kinds: unknown layer {k!r}; choose from {', '.join(KINDS)}")
    print(f"host cost per fwd+bwd step, {args.threads} thread(s), {common.cpu_name()}, torch "
          f"{torch.__version__}; medians of {args.repeats} alternated rounds")
    res = run_host(cases, tuple(kinds), args.repeats, args.threads)
    common.write_json(args.json, {"what": "host cost per attention-layer step (fwd+bwd)",
                                  "machine": common.cpu_name(), "threads": args.threads,
                                  "torch": torch.__version__, "commit": common.git_commit(),
                                  "date": datetime.date.today().isoformat(), "results": res})


if __name__ == "__main__":
    main()
