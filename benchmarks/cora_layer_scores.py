"""Cora-sized GraphAttention layer on the CPU: attention scores from x vs from h vs PyG GATConv
(fwd+bwd, 15 alternated rounds, medians). Writes benchmarks/results/cpu-2core-2026-11-25-cora-layer-scores.json."""
import time, statistics, torch
from neptune_ext.nn import GraphAttention
from torch_geometric.nn import GATConv
torch.manual_seed(0)
N, E, F, H, C = 2708, 10556, 1433, 8, 8
x = torch.randn(N, F); ei = torch.randint(0, N, (2, E))
ours = GraphAttention(F, C, heads=H); pyg = GATConv(F, C, heads=H); pyg.load_state_dict(ours.state_dict())
def step(m, mode=None):
    if mode: m.scores_from = mode
    t = time.perf_counter(); out = m(x, ei); out.sum().backward(); return time.perf_counter() - t
for m, mode in ((ours, "x"), (ours, "h"), (pyg, None)):
    for _ in range(3): step(m, mode)
res = {"x": [], "h": [], "pyg": []}
for r in range(15):
    res["x"].append(step(ours, "x")); res["h"].append(step(ours, "h")); res["pyg"].append(step(pyg))
med = {k: 1e3 * statistics.median(v) for k, v in res.items()}
print({k: round(v, 2) for k, v in med.items()}, "h vs x %.2fx" % (med["x"] / med["h"]), "ours(h) vs pyg %.2fx" % (med["pyg"] / med["h"]), "ours(x) vs pyg %.2fx" % (med["pyg"] / med["x"]))
import json, platform, subprocess
json.dump({"benchmark": "cora-sized GraphAttention layer, fwd+bwd, CPU", "machine": platform.processor() or "2-core VM",
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
           "config": {"nodes": N, "edges": E, "in": F, "heads": H, "channels": C, "rounds": 15, "alternated": ["x", "h", "pyg"]},
           "median_ms": med, "rounds_ms": {k: [1e3 * t for t in v] for k, v in res.items()}},
          open("benchmarks/results/cpu-2core-2026-11-25-cora-layer-scores.json", "w"), indent=1)
