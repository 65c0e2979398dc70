"""The layers' node projections: torch's Linear against neptune::linear (oneDNN's float32
matmul where it applies, csrc/linear/linear.h), forward and backward, on the CPU.

    python -m neptune_app.bench.projection [--rounds 15] [--json FILE]

Shapes are the projections of the attention layers' benchmark cases (rows x in -> out). Per
case, one step is y = x W^T + b and its backward for W, b and (with ``x_grad``) x; the two
contenders alternate round by round (ABAB...), medians of the rounds, speed-ups per round.
The op is called directly, so its speed is measured on any CPU; the report also says whether
the layers take it on this one (neptune_ext.attention.projection.USE_ONEDNN). A third
contender, alternated with the two, is the op with ``onednn=False``: torch's own GEMM (the
Linear's numbers) into buffers from the extension's cache, the route the layers take on any
CPU for outputs of 2 MiB or more (``cached_torch_gemm``: its times and speed-up over torch's
Linear; the difference is the page faults of a fresh output).
"""
import argparse
import statistics
import time

import torch

from . import common

CASES = {
    # name: (rows, in_features, out_features, x needs a gradient)
    "cora": (2708, 1433, 64, False),
    "pubmed": (19717, 500, 64, False),
    "minibatch": (60000, 128, 256, False),
    "graph-1M (x grad)": (100000, 128, 128, True),
    "small": (1000, 128, 64, True),
}


def _step(fn, x, lin, go):
    def run():
        t = time.perf_counter()
        y = fn(x)
        t1 = time.perf_counter()
        y.backward(go)
        t2 = time.perf_counter()
        lin.weight.grad = lin.bias.grad = x.grad = None
        return {"forward": t1 - t, "backward": t2 - t1, "step": t2 - t}
    return run


def run_case(name, rounds):
    rows, fin, fout, x_grad = CASES[name]
    torch.manual_seed(0)
    lin = torch.nn.Linear(fin, fout)
    x = torch.randn(rows, fin, requires_grad=x_grad)
    go = torch.randn(rows, fout)
    # the op itself (what the layers call where projection.USE_ONEDNN holds)
    op = torch.ops.neptune.linear
    times = common.alternate({"torch": _step(lin, x, lin, go),
                              "neptune_ext": _step(lambda t: op(t, lin.weight, lin.bias), x, lin, go),
                              "cached": _step(lambda t: op(t, lin.weight, lin.bias, False), x, lin, go)},
                             rounds, warmup=2, progress=False)
    cached = times.pop("cached")
    res = {"case": name, "rows": rows, "in": fin, "out": fout, "x_grad": x_grad,
           "median_ms": {k: {ph: common.median_ms(v) for ph, v in d.items()} for k, d in times.items()}}

    def speedup(t):
        ratios = [a / b for a, b in zip(times["torch"]["step"], t["step"])]
        return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    res["speedup"] = speedup(times["neptune_ext"])
    res["cached_torch_gemm"] = {"median_ms": {ph: common.median_ms(v) for ph, v in cached.items()},
                                "speedup": speedup(cached)}
    m = res["median_ms"]
    print(f"{name:18s} {rows}x{fin}->{fout}: torch {m['torch']['step']:.2f} ms, ours "
          f"{m['neptune_ext']['step']:.2f} ms ({res['speedup']['median']:.2f}x), torch's GEMM into "
          f"cached buffers {res['cached_torch_gemm']['median_ms']['step']:.2f} ms "
          f"({res['cached_torch_gemm']['speedup']['median']:.2f}x)", flush=True)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--json")
    a = p.parse_args(argv)
    from neptune_ext.attention import projection
    print(f"node projections, fwd+bwd, CPU: {common.machine()}; the layers take the op here: "
          f"{projection.USE_ONEDNN}", flush=True)
    report = {"benchmark": "projection", "machine": common.machine(), "torch": torch.__version__,
              "commit": common.git_commit(), "threads": torch.get_num_threads(),
              "onednn": torch.backends.mkldnn.is_available(),
              "layers_take_the_op": projection.USE_ONEDNN,
              "results": [run_case(c, a.rounds) for c in CASES]}
    common.write_json(a.json, report)
    return report


if __name__ == "__main__":
    main()
