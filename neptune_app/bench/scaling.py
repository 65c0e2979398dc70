"""Graph-attention time and peak memory against edge count, ours vs the peers.

Every (contender, size) point runs in its own process: one warm-up fwd+bwd, one
measured for peak memory, then timed rounds (median). A peer is skipped once its
memory, extrapolated linearly from the previous point, would not fit in RAM.
"""
import json
import statistics
import sys

import torch

from . import common
from .._io import save_figure

CONTENDERS = {"layer:neptune": "neptune GraphAttention", "layer:pyg": "PyG GATConv",
              "op:reference": "pure-PyTorch reference op"}


def _point_main(argv):
    name, edges, device = argv[0], int(argv[1]), argv[2]
    from .graph_attention import make_case
    nodes = max(edges // 10, 10)
    run = make_case(name, nodes, edges, heads=4, channels=16, in_channels=64, device=device)
    run()
    if device == "cpu":
        peak = common.cpu_peak_extra_bytes(run)
    else:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        peak = torch.cuda.max_memory_allocated() - base
    rounds = [run() for _ in range(3)]
    ms = statistics.median(1e3 * (r["forward"] + r["backward"]) for r in rounds)
    print(json.dumps({"ms": ms, "peak_extra_bytes": peak}))


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def scaling_plot(path: str, device: str = "cpu", quick: bool = False) -> dict:
    from .graph_attention import has_pyg
    top = 6 if quick else (8 if device == "cuda" else 7)
    sizes = [int(10 ** (e / 2)) for e in range(8, 2 * top + 1)]  # 1e4, 3e4, ..., 10^top
    names = ["layer:neptune"] + (["layer:pyg"] if has_pyg() else []) + ["op:reference"]
    budget = 0.6 * (_available_bytes() if device == "cpu" else torch.cuda.mem_get_info()[0])
    out = {n: [] for n in names}
    for n in names:
        last = None
        for E in sizes:
            if last and last[1] and last[1] * E / last[0] > budget:
                out[n].append({"edges": E, "skipped": "would not fit in memory"})
                continue
            print(f"  scaling: {CONTENDERS[n]} at {E:,} edges", file=sys.stderr, flush=True)
            r = common.run_isolated("neptune_app.bench.scaling", ["--_point", n, str(E), device])
            if "error" in r:
                out[n].append({"edges": E, "error": r["error"]})
                break
            out[n].append({"edges": E, **r})
            last = (E, r["peak_extra_bytes"])
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return out
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for n in names:
        pts = [p for p in out[n] if "ms" in p]
        if not pts:
            continue
        xs = [p["edges"] for p in pts]
        a1.loglog(xs, [p["ms"] for p in pts], "o-", label=CONTENDERS[n])
        a2.loglog(xs, [max(p["peak_extra_bytes"], 1) / 2**20 for p in pts], "o-", label=CONTENDERS[n])
    a1.set_xlabel("edges"), a1.set_ylabel("forward + backward (ms)"), a1.set_title("time")
    a2.set_xlabel("edges"), a2.set_ylabel("peak extra memory (MiB)"), a2.set_title("memory")
    for a in (a1, a2):
        a.grid(True, which="both", alpha=0.3)
        a.legend()
    fig.suptitle(f"graph attention, H=4, C=16, in=64, N=E/10 — {common.machine()}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["--_point"]:
        _point_main(sys.argv[2:])
