"""Stage benchmarks on the CPU: ResNet-18 inference, a single Stage, a training Stage stack.

    python benchmarks/bench_stage.py [--quick] [--json FILE] [--threads N] [--only SECTIONS]
    (or python -m neptune_app.bench.stage; `neptune bench` runs it too)

Contenders run alternately (A B C A B C ...) so drift in machine load hits all of
them alike; we report medians and ratios. Not a test: nothing here asserts speed.

1. ResNet-18 eval, batch 8, 224x224: eager vs torch.fx.experimental.optimization.fuse
   (BN folding only) vs neptune_ext.fuse_stages, each in NCHW and channels_last.
2. One Stage in eval at memory-bound shapes (C=32, 112x112, batch 8): eager
   Conv-BN-ReLU vs conv with folded BN + ReLU vs Stage.
3. Training step (forward + backward) of a stack of Stages vs eager: time and
   the bytes autograd saves (saved_tensors_hooks, counted once per storage).
"""
import argparse
import copy
import os
import statistics
import time

import torch
from torch import nn

import neptune_ext
import neptune_ext.info
from neptune_ext.nn import Stage

from .._util import git_commit
from .common import cpu_name, write_json


def loadavg() -> str:
    """1/5/15-minute load averages: other jobs on a 2-core machine skew every median."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def alternate(contenders: dict, repeats: int, warmup: int) -> dict:
    """Median seconds of each callable, run A B C A B C ..."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: {"median_ms": statistics.median(v) * 1e3, "min_ms": min(v) * 1e3,
                "runs_ms": [round(t * 1e3, 2) for t in v]} for k, v in times.items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters (fresh models have 0/1)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


CNNS = ("resnet18", "resnet50", "mobilenet_v2")


def bench_resnet18(args, name: str = "resnet18") -> dict:
    """A torchvision CNN in eval, batch 8, 224x224: eager, torch.fx's BN folding and
    fuse_stages, NCHW and channels_last, alternated."""
    import torchvision
    from torch.fx.experimental.optimization import fuse as fx_fuse

    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, name)()).eval()
    x = torch.randn(8, 3, 224, 224)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    fx = fx_fuse(model)
    ours = neptune_ext.fuse_stages(model)
    cl = lambda m: copy.deepcopy(m).to(memory_format=torch.channels_last)  # noqa: E731
    variants = {
        "eager": (model, x),
        "fx_fold": (fx, x),
        "fuse_stages": (ours, x),
        "fx_fold_channels_last": (cl(fx), x_cl),
        "fuse_stages_channels_last": (cl(ours), x_cl),
    }
    res = _versus_eager(variants, args.repeats_resnet, 1)
    for k in res:
        res[k]["speedup_vs_fx_fold"] = res["fx_fold"]["median_ms"] / res[k]["median_ms"]
    kinds = {}
    for line in ours.fusion_report:
        kind = line.split("-> ")[1]
        kinds[kind] = kinds.get(kind, 0) + 1
    return {"model": name, "shape": [8, 3, 224, 224], "fusion_report_len": len(ours.fusion_report),
            "fusions": kinds, "results": res}


def _versus_eager(variants: dict, repeats: int, warmup: int) -> dict:
    """{name: (module, input)} timed in alternated rounds (no grad), each with its relative
    error and its speed-up against the "eager" variant's."""
    with torch.no_grad():
        expected = variants["eager"][0](variants["eager"][1])
        errors = {k: rel_err(m(inp), expected) for k, (m, inp) in variants.items()}
        res = alternate({k: (lambda m=m, inp=inp: m(inp)) for k, (m, inp) in variants.items()},
                        repeats, warmup)
    for k in res:
        res[k]["rel_err_vs_eager"] = errors[k]
        res[k]["speedup_vs_eager"] = res["eager"]["median_ms"] / res[k]["median_ms"]
    return res


def bench_single_stage(args) -> dict:
    out = {}
    for name, (k, groups) in {"1x1": (1, 1), "3x3_depthwise": (3, 32)}.items():
        torch.manual_seed(0)
        stage = Stage(32, 32, k, padding=k // 2, groups=groups)
        randomize_bn(stage).eval()
        eager = nn.Sequential(stage.conv, stage.bn, nn.ReLU()).eval()
        with torch.no_grad():
            w, b = neptune_ext.ops.fold_conv_bn(stage.conv.weight, None, stage.bn.weight, stage.bn.bias,
                                                stage.bn.running_mean, stage.bn.running_var, stage.bn.eps)
        fold = nn.Sequential(nn.Conv2d(32, 32, k, padding=k // 2, groups=groups), nn.ReLU()).eval()
        with torch.no_grad():
            fold[0].weight.copy_(w), fold[0].bias.copy_(b)
        x = torch.randn(8, 32, 112, 112)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        variants = {"eager": (eager, x), "folded_conv_relu": (fold, x), "stage": (stage, x),
                    "eager_channels_last": (eager, x_cl),
                    "folded_conv_relu_channels_last": (fold, x_cl),
                    "stage_channels_last": (stage, x_cl)}
        res = _versus_eager(variants, args.repeats_small, 3)
        out[name] = {"shape": [8, 32, 112, 112], "kernel": k, "groups": groups, "results": res}
    return out


def saved_bytes(fn, exclude=()) -> int:
    """Bytes of all tensors autograd saves while fn runs, counted once per storage, leaving
    out the tensors in ``exclude`` (a model's parameters: the activations are what differs)
    and their dtype casts (autocast's copies of the weights)."""
    storages = {}
    skip = {t.untyped_storage().data_ptr() for t in exclude}

    def cast_of_excluded(t) -> bool:
        fn = t.grad_fn
        if fn is None or type(fn).__name__ != "ToCopyBackward0" or not fn.next_functions:
            return False
        src = fn.next_functions[0][0]
        return hasattr(src, "variable") and src.variable.untyped_storage().data_ptr() in skip

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip and not (skip and cast_of_excluded(t)):
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    y.sum().backward()
    return sum(storages.values())


def bench_training(args) -> dict:
    torch.manual_seed(0)
    depth, C, HW, N = 4, 32, 56, 8
    layers = [Stage(C, C, 3, padding=1) for _ in range(depth)]
    ours = nn.Sequential(*layers).train()
    ours_keep = copy.deepcopy(ours)
    for s in ours_keep:
        s.memory_efficient = False
    eager = nn.Sequential(*[m for s in layers for m in (copy.deepcopy(s.conv), copy.deepcopy(s.bn),
                                                       nn.ReLU(inplace=True))]).train()
    x = torch.randn(N, C, HW, HW, requires_grad=True)
    variants = {"eager": eager, "stage_stack": ours, "stage_stack_no_recompute": ours_keep}

    def step(m):
        def run():
            m.zero_grad(set_to_none=True)
            x.grad = None
            m(x).square().mean().backward()
        return run

    res = alternate({k: step(m) for k, m in variants.items()}, args.repeats_small, 2)
    mem = {k: saved_bytes(lambda m=m: m(x)) for k, m in variants.items()}
    for k in res:
        res[k]["saved_bytes"] = mem[k]
        res[k]["saved_mb"] = mem[k] / 2**20
        res[k]["saved_vs_eager"] = mem[k] / mem["eager"]
        res[k]["speedup_vs_eager"] = res["eager"]["median_ms"] / res[k]["median_ms"]
    return {"depth": depth, "shape": [N, C, HW, HW], "kernel": 3, "results": res}


def table(title: str, res: dict, cols) -> str:
    lines = [title]
    width = max(len(k) for k in res) + 2
    head = f"  {'contender':<{width}}" + "".join(f"{c[0]:>14}" for c in cols)
    lines += [head, "  " + "-" * (len(head) - 2)]
    for name, r in res.items():
        cells = []
        for _, key, fmt in cols:
            v = r.get(key)
            cells.append(f"{format(v, fmt) if v is not None else '-':>14}")
        lines.append(f"  {name:<{width}}" + "".join(cells))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few repetitions (a smoke run)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--only", default="resnet18,single,train",
                   help="comma-separated sections to run: resnet18, resnet50, mobilenet_v2 "
                        "(whole models in eval), single, train")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.repeats_resnet = 3 if args.quick else 21
    args.repeats_small = 5 if args.quick else 51

    info = neptune_ext.info.info_dict()
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "neptune_ext": info["neptune_ext"],
               "extension_loaded": info["extension_loaded"],
               "onednn_fused": neptune_ext.stage.functional.onednn_fused_available(),
               "quick": args.quick, "loadavg_start": loadavg(), "commit": git_commit()}
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['threads']} threads, "
          f"torch {machine['torch']}, extension loaded: {machine['extension_loaded']}, "
          f"oneDNN fused conv: {machine['onednn_fused']}, load average {machine['loadavg_start']}\n")

    sections = set(args.only.split(","))
    unknown = sections - set(CNNS) - {"single", "train"}
    if unknown:
        p.error(f"--only: unknown section(s) {sorted(unknown)}")
    results = {"machine": machine}
    t_cols = [("median ms", "median_ms", ".1f"), ("min ms", "min_ms", ".1f")]
    for name in CNNS:
        if name not in sections:
            continue
        results[f"{name}_eval"] = r = bench_resnet18(args, name)
        print(table(f"{name} eval, batch 8, 224x224 (float32); fused: {r['fusions']}", r["results"],
                    t_cols + [("vs fx_fold", "speedup_vs_fx_fold", ".2f"),
                              ("vs eager", "speedup_vs_eager", ".2f"),
                              ("rel err", "rel_err_vs_eager", ".1e")]))
        print()
    if "single" in sections:
        results["single_stage_eval"] = r = bench_single_stage(args)
        for name, sub in r.items():
            print(table(f"Stage eval {name}, C=32 -> 32, 8x112x112 (float32)", sub["results"],
                        t_cols + [("vs eager", "speedup_vs_eager", ".2f"),
                                  ("rel err", "rel_err_vs_eager", ".1e")]))
            print()
    if "train" in sections:
        results["stage_stack_train"] = r = bench_training(args)
        print(table(f"Training step (fwd+bwd), {r['depth']} Stages C=32 3x3, 8x56x56 (float32)",
                    r["results"], t_cols + [("vs eager", "speedup_vs_eager", ".2f"),
                                            ("saved MiB", "saved_mb", ".1f"),
                                            ("saved/eager", "saved_vs_eager", ".2f")]))
    machine["loadavg_end"] = loadavg()
    print(f"\nload average at the end: {machine['loadavg_end']} (medians are only meaningful "
          "when nothing else ran)")
    write_json(args.json, results)
    return results


def run(device: str = "cpu", quick: bool = False) -> dict:
    """The Stage section of `neptune bench` (CPU; the GPU one is neptune_app/bench/gpu_stage.py)."""
    if device != "cpu":
        print("(the GPU Stage benchmark is benchmarks/gpu_stage.py, run by scripts/gpu_check.sh)")
        return {}
    return main(["--quick"] if quick else [])


if __name__ == "__main__":
    main()
