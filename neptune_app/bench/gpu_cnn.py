"""Whole CNNs with fuse_stages against eager, torch.fx BN folding and torch.compile.

    python -m neptune_app.bench.gpu_cnn [--device cuda] [--models resnet18,resnet50]
        [--batch 64] [--size 224] [--rounds 7] [--reps 10] [--no-compile] [--json FILE]

Inference (eval, no autograd, channels_last), for each model and each precision —
``fp32``, ``bf16`` (the model and input in bfloat16) and ``bf16-autocast`` (float32 model
under ``torch.autocast``):
  * eager          the torchvision model;
  * fx_fold        ``torch.fx.experimental.optimization.fuse`` (BN folded into the convs);
  * fuse_stages    ``neptune_ext.fuse_stages`` (one fused call per conv: cuDNN's
                   conv+bias+ReLU / conv+bias+add+ReLU on CUDA, oneDNN post-ops on the CPU);
  * compile        ``torch.compile(model)`` (default mode) of the eager model.
Contenders alternate round by round (A B C D A B C D ...); each round times ``--reps``
calls (CUDA events on CUDA) and the medians over rounds are reported, with the
relative error of each output against eager float32 and the Stage paths taken.

With ``--layers``: every distinct convolution of the first model in bfloat16, as our one
fused call (cuDNN's; CUTLASS's where built) against eager's conv + BN + ReLU (+ add), with
TFLOP/s and the fraction of the device's measured bfloat16 matmul rate.

Training (one step: forward, backward; no optimizer), fp32 and bf16 autocast:
  * a stack of 4 Conv3x3-BN-ReLU (C=64, batch 64, 56x56): eager vs ``Stage``;
  * the model: eager vs ``fuse_stages``;
time per step and peak memory above the model and input (the activations autograd keeps).
"""
import argparse
import copy
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict

import torch
from torch import nn

import neptune_ext
from neptune_ext.backend import cutlass_built

from .common import git_commit, machine, write_json
from .stage import randomize_bn

PRECISIONS = ("fp32", "bf16", "bf16-autocast")


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, reps: int) -> float:
    """Milliseconds per call of fn over reps calls (CUDA events on CUDA)."""
    if device == "cuda":
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(reps):
            fn()
        e1.record()
        torch.cuda.synchronize()
        return e0.elapsed_time(e1) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1e3 / reps


def alternate_ms(contenders: Dict[str, Callable[[], object]], device: str, rounds: int,
                 reps: int, warmup: int = 3) -> Dict[str, dict]:
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times = {k: [] for k in contenders}
    for r in range(rounds):
        for name, fn in contenders.items():
            times[name].append(time_ms(fn, device, reps))
        print(f"  round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)}
            for k, v in times.items()}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm()).item()


def bench_inference(name: str, args) -> dict:
    import torchvision
    from torch.fx.experimental.optimization import fuse as fx_fuse
    from neptune_ext.stage.eval import eval_path_counts, reset_eval_path_counts

    dev = args.device
    torch.manual_seed(0)
    base = randomize_bn(getattr(torchvision.models, name)()).eval().to(dev)
    base = base.to(memory_format=torch.channels_last)
    x32 = torch.randn(args.batch, 3, args.size, args.size, device=dev)
    x32 = x32.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = base(x32)
    out = {}
    for prec in args.precisions:
        dtype = torch.bfloat16 if prec == "bf16" else torch.float32
        model = copy.deepcopy(base).to(dtype)
        x = x32.to(dtype)
        models = {"eager": model, "fx_fold": fx_fuse(copy.deepcopy(model)),
                  "fuse_stages": neptune_ext.fuse_stages(model)}
        if args.compile:
            models["compile"] = torch.compile(copy.deepcopy(model))
        autocast = prec == "bf16-autocast"
        # The CUTLASS convolution (opt-in) where built: float16/bfloat16 convolutions only.
        cutlass = dev == "cuda" and prec != "fp32" and cutlass_built()
        if cutlass:
            models["fuse_stages_cutlass"] = models["fuse_stages"]

        def runner(m, use_cutlass=False):
            def run():
                with _cutlass_env(use_cutlass), torch.no_grad(), \
                        torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
                    return m(x)
            return run
        contenders = {k: runner(m, k == "fuse_stages_cutlass") for k, m in models.items()}
        errors = {k: rel_err(fn(), ref) for k, fn in contenders.items()}
        reset_eval_path_counts()
        contenders["fuse_stages"]()
        paths = eval_path_counts()
        if cutlass:
            reset_eval_path_counts()
            contenders["fuse_stages_cutlass"]()
            paths = {"default": paths, "cutlass": eval_path_counts()}
        print(f"{name} {prec}: timing {', '.join(contenders)}", file=sys.stderr, flush=True)
        res = alternate_ms(contenders, dev, args.rounds, args.reps)
        for k, r in res.items():
            r["rel_err_vs_eager_fp32"] = errors[k]
            r["speedup_vs_eager"] = res["eager"]["median_ms"] / r["median_ms"]
            if "compile" in res:
                r["speedup_vs_compile"] = res["compile"]["median_ms"] / r["median_ms"]
        out[prec] = {"results": res, "stage_paths_per_forward": paths,
                     "fusions": len(models["fuse_stages"].fusion_report)}
        print_table(f"{name} inference, batch {args.batch}, {args.size}x{args.size}, channels_last, "
                    f"{prec}; Stage paths per forward {paths}", res)
    return out


class _cutlass_env:
    """NEPTUNE_STAGE_CUTLASS=1 inside the block when ``on`` (the previous value restored)."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.old = os.environ.get("NEPTUNE_STAGE_CUTLASS")
        if self.on:
            os.environ["NEPTUNE_STAGE_CUTLASS"] = "1"

    def __exit__(self, *exc):
        if self.on:
            if self.old is None:
                os.environ.pop("NEPTUNE_STAGE_CUTLASS", None)
            else:
                os.environ["NEPTUNE_STAGE_CUTLASS"] = self.old


def tensor_core_tflops(device: str, dtype=torch.bfloat16, n: int = 8192) -> float:
    """The device's measured dense matmul rate (TFLOP/s) in ``dtype``: the ceiling a
    convolution's implicit GEMM is held against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = statistics.median(time_ms(lambda: a @ b, device, 5) for _ in range(5))
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def bench_layers(name: str, args) -> dict:
    """Each distinct convolution of the model (eval, channels_last, ``--layer-dtype``) as one
    fused call of ours (cuDNN's, and CUTLASS's where built) against eager's conv + BN + ReLU
    (+ add), with TFLOP/s against the device's measured matmul rate."""
    import torchvision
    from neptune_ext.stage import eval as stage_eval
    dev, dtype = args.device, torch.bfloat16
    model = getattr(torchvision.models, name)()
    peak = tensor_core_tflops(dev, dtype) if dev == "cuda" else None
    size, shapes, seen = args.size, [], set()
    x = torch.randn(1, 3, size, size)
    hooks = []

    def record(m, inp, out):
        key = (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.groups,
               tuple(inp[0].shape[2:]))
        if key not in seen:
            seen.add(key)
            shapes.append(key)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(record))
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    rows = []
    cl = torch.channels_last
    for c_in, c_out, k, s, p, g, hw in shapes:
        inp = torch.randn(args.batch, c_in, *hw, device=dev, dtype=dtype).contiguous(memory_format=cl)
        w = torch.randn(c_out, c_in // g, *k, device=dev, dtype=dtype).contiguous(memory_format=cl)
        bias = torch.randn(c_out, device=dev, dtype=dtype)
        bn = nn.BatchNorm2d(c_out).to(dev, dtype).eval()
        out_shape = stage_eval.conv_output_shape(inp, w, s, p, (1, 1))
        res = torch.randn(out_shape, device=dev, dtype=dtype).contiguous(memory_format=cl)
        flops = 2 * out_shape[0] * out_shape[2] * out_shape[3] * c_out * (c_in // g) * k[0] * k[1]
        contenders = {
            "eager_conv_bn_relu": lambda: torch.relu(bn(torch.nn.functional.conv2d(inp, w, None, s, p, 1, g))),
            "ours_conv_bias_relu": lambda: stage_eval._conv_bias_act(inp, w, bias, s, p, (1, 1), g, "relu"),
            "eager_conv_bn_add_relu": lambda: torch.relu(bn(torch.nn.functional.conv2d(inp, w, None, s, p, 1, g)) + res),
            "ours_conv_bias_add_relu": lambda: stage_eval._conv_bias_act(inp, w, bias, s, p, (1, 1), g, "relu",
                                                                      residual=res),
        }
        if dev == "cuda" and cutlass_built():
            def with_cutlass(fn):
                def run():
                    with _cutlass_env(True):
                        return fn()
                return run
            contenders["cutlass_conv_bias_relu"] = with_cutlass(contenders["ours_conv_bias_relu"])
            contenders["cutlass_conv_bias_add_relu"] = with_cutlass(contenders["ours_conv_bias_add_relu"])
        with torch.no_grad():
            res_ms = alternate_ms(contenders, dev, args.rounds, args.reps)
        row = {"in": c_in, "out": c_out, "kernel": list(k), "stride": list(s), "groups": g,
               "input_hw": list(hw), "gflop": flops / 1e9}
        for k_, r in res_ms.items():
            row[k_ + "_ms"] = r["median_ms"]
            row[k_ + "_tflops"] = flops / (r["median_ms"] * 1e-3) / 1e12
            if peak:
                row[k_ + "_of_peak"] = row[k_ + "_tflops"] / peak
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"model": name, "dtype": "bf16", "batch": args.batch, "size": size,
            "matmul_peak_tflops": peak, "layers": rows}


def _peak_step(forward: Callable[[], torch.Tensor], device: str, model: nn.Module) -> float:
    """Peak bytes allocated during a forward + backward above what was allocated before it
    (CUDA); the bytes autograd saves in the forward, parameters aside (CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        forward().float().square().mean().backward()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    from .stage import saved_bytes
    return float(saved_bytes(forward, exclude=list(model.parameters())))


def bench_training(label: str, make_model: Callable[[], nn.Module], shape, args) -> dict:
    dev = args.device
    torch.manual_seed(0)
    eager = make_model().to(dev).train().to(memory_format=torch.channels_last)
    # The memory-saving training path (the design's target: <=0.6x eager's activations);
    # fuse_stages' default keeps eager's memory.
    fused = neptune_ext.fuse_stages(eager, memory_efficient=True)
    x = torch.randn(*shape, device=dev).contiguous(memory_format=torch.channels_last)
    out = {}
    for prec in ("fp32", "bf16-autocast"):
        autocast = prec == "bf16-autocast"

        def forward(m):
            def run():
                with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
                    return m(x)
            return run

        def stepper(m):
            def step():
                forward(m)().float().square().mean().backward()
                m.zero_grad(set_to_none=True)
            return step
        contenders = {"eager": stepper(eager), "fuse_stages": stepper(fused)}
        memory = {}
        for k, m in (("eager", eager), ("fuse_stages", fused)):
            memory[k] = _peak_step(forward(m), dev, m)
            m.zero_grad(set_to_none=True)
        res = alternate_ms(contenders, dev, args.rounds, max(1, args.reps // 2))
        for k, r in res.items():
            r["peak_extra_MiB"] = memory[k] / 2**20
            r["memory_vs_eager"] = memory[k] / memory["eager"] if memory["eager"] else None
            r["speedup_vs_eager"] = res["eager"]["median_ms"] / r["median_ms"]
        out[prec] = {"results": res}
        print_table(f"training step, {label}, {prec}", res)
    return out


def print_table(title: str, res: Dict[str, dict]):
    print(f"\n{title}")
    keys = [k for k in ("median_ms", "min_ms", "speedup_vs_eager", "speedup_vs_compile",
                        "rel_err_vs_eager_fp32", "peak_extra_MiB", "memory_vs_eager")
            if any(k in r for r in res.values())]
    print("  " + f"{'contender':<14}" + "".join(f"{k:>24}" for k in keys))
    for name, r in res.items():
        cells = []
        for k in keys:
            v = r.get(k)
            cells.append(f"{'-' if v is None else (f'{v:.2e}' if 'err' in k else f'{v:.3f}'):>24}")
        print("  " + f"{name:<14}" + "".join(cells), flush=True)


class StageStack(nn.Sequential):
    def __init__(self, depth: int = 4, channels: int = 64):
        layers = []
        for _ in range(depth):
            layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                       nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        super().__init__(*layers)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--precisions", default=",".join(PRECISIONS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="leave torch.compile out (it takes minutes on a CPU)")
    p.add_argument("--no-training", dest="training", action="store_false")
    p.add_argument("--layers", action="store_true",
                   help="also time each distinct conv of the first model, fused, against eager")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    args.precisions = args.precisions.split(",")
    bad = set(args.precisions) - set(PRECISIONS)
    if bad:
        p.error(f"--precisions: unknown {sorted(bad)} (choose from {', '.join(PRECISIONS)})")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    import torchvision
    report = {"device": machine() if args.device == "cuda" else f"cpu: {machine()}",
              "torch": torch.__version__, "torchvision": torchvision.__version__,
              "cuda": torch.version.cuda, "commit": git_commit(), "args": vars(args),
              "inference": {}, "training": {}}
    print(f"{report['device']}, torch {report['torch']}, commit {report['commit']}", flush=True)
    for name in args.models.split(","):
        report["inference"][name] = bench_inference(name, args)
    if args.layers:
        report["layers"] = bench_layers(args.models.split(",")[0], args)
    if args.training:
        report["training"]["stage_stack_4x3x3_c64"] = bench_training(
            "4 x Conv3x3-BN-ReLU, C=64", StageStack, (args.batch, 64, 56 * args.size // 224,
                                                     56 * args.size // 224), args)
        first = args.models.split(",")[0]
        report["training"][first] = bench_training(
            first, lambda: randomize_bn(getattr(torchvision.models, first)()),
            (args.batch, 3, args.size, args.size), args)
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
