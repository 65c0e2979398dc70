"""`neptune bench`: graph attention, Stage and whole models side by side with the peers
that are installed, one table; optional JSON and a scaling plot."""
import sys
import time

import torch

from . import common


def bench_neptune_model(device="cpu", batch=64, repeats=5):
    """Neptune training step and inference on a batch of digits-sized images: the fused
    kernels vs the same model with every neptune op on its pure-PyTorch reference
    (eager Conv-BN-ReLU, scatter-based attention)."""
    from ..models import Neptune
    torch.manual_seed(0)
    model = Neptune(10, 1, 8).to(device)
    x = torch.randn(batch, 1, 8, 8, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step(ref):
        def run():
            with common.force_reference(ref):
                model.train()
                _, t_train = common.timed(lambda: _train_step(model, opt, x, y), device)
                model.eval()
                with torch.no_grad():
                    _, t_inf = common.timed(lambda: model(x), device)
            return {"train_step": t_train, "inference": t_inf}
        return run

    times = common.alternate({"neptune (fused)": step(False), "neptune (reference ops)": step(True)},
                             repeats, progress=False)
    return {k: {p: common.median_ms(v) for p, v in ph.items()} for k, ph in times.items()}


def _train_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss


def run_suite(device="cpu", quick=False, json_path=None, plot_path=None):
    from .graph_attention import run_benchmark
    t0 = time.perf_counter()
    print(f"neptune bench on {common.machine()} (torch {torch.__version__}, {device})\n")
    if device == "cuda" and not torch.cuda.is_available():
        from ..data import DatasetError
        raise DatasetError("--device cuda was requested but no CUDA GPU is available")
    report = {"machine": common.machine(), "torch": torch.__version__, "commit": common.git_commit(),
              "device": device, "quick": quick}
    print("== graph attention ==")
    what = ("op", "layer", "gatv2")
    if quick:
        ga = run_benchmark(20_000, 200_000, repeats=3, what=what, device=device, memory=device == "cpu")
    else:
        ga = run_benchmark(what=what, device=device, memory=device == "cpu")
    report["graph_attention"] = ga

    print("\n== graph attention where users train (per step; vs PyG GATConv) ==")
    try:
        from . import user_graphs
        report["user_graphs"] = [user_graphs.run_case(c, device, rounds=3 if quick else 7, compiled=not quick)
                                 for c in (("cora", "pubmed") if quick else tuple(user_graphs.CASES))]
    except ImportError as exc:
        print(f"(skipped: {exc})")

    print("\n== Stage (Conv-BN-ReLU) ==")
    try:
        from . import stage as stage_bench
        report["stage"] = stage_bench.run(device=device, quick=quick)
    except ImportError:
        print("(stage benchmark not available)")

    print("\n== whole models ==")
    rows = []
    nep = bench_neptune_model(device, batch=64, repeats=3 if quick else 7)
    report["neptune_model"] = nep
    base = nep["neptune (reference ops)"]
    for k, v in nep.items():
        rows.append([k, "train step, 64 digits", f"{v['train_step']:.1f}",
                     f"{base['train_step'] / v['train_step']:.2f}x"])
        rows.append([k, "inference, 64 digits", f"{v['inference']:.1f}",
                     f"{base['inference'] / v['inference']:.2f}x"])
    common.print_table(rows, ["model", "what", "median ms", "speedup vs baseline"])
    print("(baseline: 'neptune (reference ops)' = the same model on eager PyTorch layers: "
          "eager Conv-BN-ReLU and scatter-based attention; ResNet-18 is in the Stage section)")

    if plot_path:
        common.write_json(json_path, report, quiet=True)  # (the results so far are kept, whatever the plot does)
        from .scaling import scaling_plot
        report["scaling"] = scaling_plot(plot_path, device=device, quick=quick)
    common.write_json(json_path, report)
    print(f"\nbench done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return report
