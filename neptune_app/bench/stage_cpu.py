"""fuse_stages on the CPU as users call it: whole torchvision CNNs in eval, fed plain NCHW
input (what torchvision's transforms give) and channels_last input, at batch 1 and 8;
optionally bf16 autocast and a ResNet-18 training step.

    python -m neptune_app.bench.stage_cpu [--models resnet18,mobilenet_v2] [--batches 1,8]
        [--repeats 7] [--image-size 224] [--autocast] [--train] [--json FILE]

Contenders: eager, torch.fx BN folding (``torch.fx.experimental.optimization.fuse``) and
``neptune_ext.fuse_stages``, each given the same input; for channels_last, model and input
converted as a user would (``model.to(memory_format=torch.channels_last)``). torchvision
models with weights=None and randomized BN statistics (so folding matters), ``eval()``,
``torch.inference_mode()``. Contenders of one (model, batch, layout) run alternately, round
by round (A B C A B C ...), so drift in machine load hits all alike; medians and ratios.
Not a test: nothing here asserts speed.
"""
import argparse
import copy
import datetime
import os
import statistics
import time

import torch
from torch import nn

import neptune_ext
import neptune_ext.info

from .._util import git_commit
from .common import cpu_name, write_json
from .stage import loadavg, randomize_bn, rel_err, saved_bytes

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0")
CONTENDERS = ("eager", "fx_fold", "fuse_stages")


def _time(contenders: dict, repeats: int, inner: int) -> dict:
    """{name: median ms per call}: one warm-up call each, then ``repeats`` rounds in which
    every contender runs ``inner`` calls in turn."""
    for fn in contenders.values():
        fn()
    times = {k: [] for k in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t0) / inner)
    return {k: {"median_ms": statistics.median(v) * 1e3, "min_ms": min(v) * 1e3,
                "runs_ms": [round(t * 1e3, 3) for t in v]} for k, v in times.items()}


def _models(name: str):
    """(eager, fx-folded, fuse_stages) of one torchvision model, BN statistics randomized."""
    import torchvision
    from torch.fx.experimental.optimization import fuse as fx_fuse
    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, name)(weights=None)).eval()
    return {"eager": model, "fx_fold": fx_fuse(model), "fuse_stages": neptune_ext.fuse_stages(model)}


def _output_format(y) -> str:
    if not isinstance(y, torch.Tensor) or y.dim() != 4:
        return "-"
    return "channels_last" if (y.is_contiguous(memory_format=torch.channels_last)
                               and not y.is_contiguous()) else "contiguous"


def bench_eval(name: str, batches, size: int, repeats: int, autocast: bool) -> dict:
    models = _models(name)
    cl_models = {k: copy.deepcopy(m).to(memory_format=torch.channels_last) for k, m in models.items()}
    out = {}
    for batch in batches:
        torch.manual_seed(1)
        x = torch.randn(batch, 3, size, size)
        for layout, ms, inp in (("nchw", models, x),
                                ("channels_last", cl_models, x.contiguous(memory_format=torch.channels_last))):
            ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else torch.no_grad
            with torch.inference_mode(), ctx():
                expected = ms["eager"](inp)
                errors = {k: rel_err(m(inp), expected) for k, m in ms.items()}
                res = _time({k: (lambda m=m: m(inp)) for k, m in ms.items()}, repeats,
                            inner=4 if batch == 1 else 1)
            for k in res:
                res[k]["rel_err_vs_eager"] = errors[k]
                res[k]["vs_fx"] = res["fx_fold"]["median_ms"] / res[k]["median_ms"]
                res[k]["vs_eager"] = res["eager"]["median_ms"] / res[k]["median_ms"]
            out[f"batch{batch}_{layout}"] = {"batch": batch, "layout": layout,
                                             "image_size": size, "results": res}
    return out


def bench_train(size: int, batch: int, repeats: int) -> dict:
    """ResNet-18 training step (forward, backward, no optimizer) at ``batch``: eager vs
    fuse_stages' default and memory_efficient=True; time and the bytes autograd saves."""
    import torchvision
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(weights=None)).train()
    variants = {"eager": model,
                "fuse_stages": neptune_ext.fuse_stages(model),
                "fuse_stages_memory_efficient": neptune_ext.fuse_stages(model, memory_efficient=True)}
    x = torch.randn(batch, 3, size, size)
    params = list(model.parameters())

    def step(m):
        def run():
            m.zero_grad(set_to_none=True)
            m(x).square().mean().backward()
        return run

    res = _time({k: step(m) for k, m in variants.items()}, repeats, inner=1)
    for k, m in variants.items():
        mem = saved_bytes(lambda m=m: m(x), exclude=list(m.parameters()) + params)
        res[k]["saved_mb"] = mem / 2**20
    for k in res:
        res[k]["saved_vs_eager"] = res[k]["saved_mb"] / res["eager"]["saved_mb"]
        res[k]["time_vs_eager"] = res[k]["median_ms"] / res["eager"]["median_ms"]
    return {"model": "resnet18", "batch": batch, "image_size": size, "results": res}


def print_eval(name: str, sections: dict, autocast: bool) -> None:
    print(f"{name}, eval{' (bf16 autocast)' if autocast else ''}: median ms per call "
          "(ratios = other's time / this one's)")
    print(f"  {'batch, input':<22}{'eager':>9}{'fx fold':>9}{'fuse':>9}{'vs fx':>8}{'vs eager':>9}"
          f"{'rel err':>13}")
    for sec in sections.values():
        r = sec["results"]
        f = r["fuse_stages"]
        print(f"  {str(sec['batch']) + ', ' + sec['layout']:<22}{r['eager']['median_ms']:>9.2f}"
              f"{r['fx_fold']['median_ms']:>9.2f}{f['median_ms']:>9.2f}{f['vs_fx']:>7.2f}x"
              f"{f['vs_eager']:>8.2f}x{f['rel_err_vs_eager']:>13.1e}")
    print()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated torchvision models (default {','.join(MODELS)})")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=15, help="alternated rounds per case")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--autocast", action="store_true", help="also every case under bf16 autocast")
    p.add_argument("--no-fp32", action="store_true", help="skip the float32 cases")
    p.add_argument("--train", action="store_true",
                   help="also a ResNet-18 training step (batch 8) with saved-activation memory")
    p.add_argument("--train-repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m for m in args.models.split(",") if m]
    unknown = set(models) - set(MODELS)
    if unknown:
        p.error(f"--models: unknown {sorted(unknown)} (known: {', '.join(MODELS)})")
    batches = [int(b) for b in args.batches.split(",") if b]
    info = neptune_ext.info.info_dict()
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "neptune_ext": info["neptune_ext"],
               "extension_loaded": info["extension_loaded"], "commit": git_commit(),
               "date": datetime.date.today().isoformat(), "loadavg_start": loadavg(),
               "args": vars(args)}
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['threads']} threads, "
          f"torch {machine['torch']}, commit {machine['commit']}, load {machine['loadavg_start']}\n")
    results = {"machine": machine, "eval": {}, "eval_bf16_autocast": {}}
    for name in models:
        for autocast in ([False] if not args.no_fp32 else []) + ([True] if args.autocast else []):
            key = "eval_bf16_autocast" if autocast else "eval"
            results[key][name] = sec = bench_eval(name, batches, args.image_size, args.repeats, autocast)
            print_eval(name, sec, autocast)
    if args.train:
        results["train"] = r = bench_train(args.image_size, 8, args.train_repeats)
        print(f"ResNet-18 training step (forward + backward), batch 8, {args.image_size}²:")
        for k, v in r["results"].items():
            print(f"  {k:<30}{v['median_ms']:>9.1f} ms{v['time_vs_eager']:>7.2f}x eager's time"
                  f"{v['saved_mb']:>9.1f} MiB saved{v['saved_vs_eager']:>7.2f}x eager's")
    machine["loadavg_end"] = loadavg()
    print(f"\nload average at the end: {machine['loadavg_end']}")
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
