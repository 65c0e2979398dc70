"""Cora-sized GraphAttention layer on the CPU: attention scores from x vs from h, and PyG's
GATConv (same weights), forward + backward, rounds alternated (x, h, PyG, x, h, PyG, ...).

    python benchmarks/cora_layer_scores.py [--rounds 15] [--json FILE]

Recorded: benchmarks/results/cpu-2core-2026-11-25-cora-layer-scores.json.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neptune_app.bench.common import alternate, git_commit, machine, median_ms  # noqa: E402
from neptune_ext.nn import GraphAttention  # noqa: E402

N, E, F, H, C = 2708, 10556, 1433, 8, 8  # Cora's sizes, 8 heads x 8 channels


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--json")
    a = p.parse_args(argv)
    from torch_geometric.nn import GATConv
    torch.manual_seed(0)
    x, ei = torch.randn(N, F), torch.randint(0, N, (2, E))
    ours = GraphAttention(F, C, heads=H)
    pyg = GATConv(F, C, heads=H)
    pyg.load_state_dict(ours.state_dict())

    def step(m, scores_from=None):
        if scores_from:
            m.scores_from = scores_from
        t = time.perf_counter()
        m(x, ei).sum().backward()
        return {"fwd+bwd": time.perf_counter() - t}

    contenders = {"x": lambda: step(ours, "x"), "h": lambda: step(ours, "h"), "pyg": lambda: step(pyg)}
    rounds = {k: v["fwd+bwd"] for k, v in alternate(contenders, a.rounds, warmup=3).items()}
    med = {k: median_ms(v) for k, v in rounds.items()}
    print({k: round(v, 2) for k, v in med.items()}, f"h vs x {med['x'] / med['h']:.2f}x",
          f"ours(h) vs pyg {med['pyg'] / med['h']:.2f}x", f"ours(x) vs pyg {med['pyg'] / med['x']:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"benchmark": "cora-sized GraphAttention layer, fwd+bwd, CPU", "machine": machine(),
                       "threads": torch.get_num_threads(), "torch": torch.__version__, "commit": git_commit(),
                       "config": {"nodes": N, "edges": E, "in": F, "heads": H, "channels": C,
                                  "rounds": a.rounds, "alternated": list(contenders)},
                       "median_ms": med, "rounds_ms": {k: [1e3 * t for t in v] for k, v in rounds.items()}},
                      f, indent=1)


if __name__ == "__main__":
    main()
