"""Host cost of one training step of ``examples/sampled_gat.py``: microseconds and ATen/neptune
op calls per step (forward, loss, backward, optimizer), the model as the example builds it
(two GraphAttention layers, 4 heads, hidden 32, dropout 0.1, Adam) on the mini-batches its
sampler hands out (fanout 10,10, 512 seeds, a new ``edge_index`` every step), next to the same
stack of PyG's GATConv (same weights) when PyG is installed.

    python -m neptune_app.bench.sampled_step [--threads 1] [--steps 30] [--json FILE]

Sampling and the feature gather are done before timing (they are the same for both stacks);
the stacks alternate step by step over the same batches; medians.
"""
import argparse
import statistics
import time
import copy

import torch
import torch.nn.functional as F

from . import common
from .host import _CountOps


def _pyg_stack(ours):
    """The same GATStack with PyG's GATConv in place of each layer, with ours' weights."""
    from torch_geometric.nn import GATConv
    theirs = copy.deepcopy(ours)
    theirs.convs = torch.nn.ModuleList(
        GATConv(c.in_channels, c.out_channels, heads=c.heads, concat=c.concat, dropout=c.dropout)
        for c in ours.convs)
    theirs.load_state_dict(ours.state_dict())
    return theirs


def _step(net, opt, batch):
    x, ei, y, bs = batch
    out = net(x, ei)[:bs]
    loss = F.cross_entropy(out.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def run(threads=1, steps=30, nodes=100_000, edges=1_000_000):
    from neptune_app.sampled import GATStack, NeighborSampler, synthetic_graph
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        graph = synthetic_graph(nodes, edges, 64, 8, seed=0)
        sampler = NeighborSampler(graph["edge_index"], nodes, [10, 10],
                                  generator=torch.Generator().manual_seed(0))
        seeds = torch.randperm(nodes, generator=torch.Generator().manual_seed(1))
        batches = []
        for i in range(steps + 3):
            n_id, ei, bs = sampler.sample(seeds[i * 512:(i + 1) * 512])
            batches.append((graph["x"][n_id], ei, graph["y"][n_id[:bs]], bs))
        ours = GATStack(64, 32, 8, layers=2, heads=4, dropout=0.1)
        nets = {"neptune_ext": ours}
        try:
            nets["pyg"] = _pyg_stack(ours)
        except ImportError:
            pass
        opts = {k: torch.optim.Adam(n.parameters(), lr=5e-3) for k, n in nets.items()}
        for k in nets:  # warm-up
            for b in batches[:3]:
                _step(nets[k], opts[k], b)
        times = {k: [] for k in nets}
        for b in batches[3:]:
            for k in nets:
                t = time.perf_counter()
                _step(nets[k], opts[k], b)
                times[k].append(time.perf_counter() - t)
        calls = {}
        for k in nets:
            with _CountOps() as c:
                for b in batches[3:6]:
                    _step(nets[k], opts[k], b)
            calls[k] = sum(c.calls.values()) / 3
        res = {"threads": threads, "steps": steps, "graph": {"nodes": nodes, "edges": edges},
               "edges_per_batch": statistics.median(b[1].shape[1] for b in batches),
               "median_us": {k: 1e6 * statistics.median(v) for k, v in times.items()},
               "op_calls_per_step": calls}
        if "pyg" in times:
            ratios = [p / o for p, o in zip(times["pyg"], times["neptune_ext"])]
            res["speedup_vs_pyg"] = statistics.median(ratios)
        return res
    finally:
        torch.set_num_threads(before)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--json")
    a = p.parse_args(argv)
    res = run(a.threads, a.steps)
    m, c = res["median_us"], res["op_calls_per_step"]
    print(f"sampled_gat step ({common.cpu_name()}, {a.threads} thread(s)), ~{res['edges_per_batch']:.0f} edges a batch:")
    for k in m:
        print(f"  {k:12s} {m[k]:10.0f} us  {c[k]:6.0f} op calls")
    if "speedup_vs_pyg" in res:
        print(f"  speed vs PyG: {res['speedup_vs_pyg']:.2f}x")
    report = {"benchmark": "sampled_step", "machine": f"{common.cpu_name()}, {a.threads} thread(s)", "torch": torch.__version__,
              "commit": common.git_commit(), **res}
    common.write_json(a.json, report)
    return report


if __name__ == "__main__":
    main()
