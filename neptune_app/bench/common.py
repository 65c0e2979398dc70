"""Timing and memory helpers shared by the benchmarks."""
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Sequence

import torch

from neptune_ext.backend import force_reference  # noqa: F401  (re-exported for the benchmarks)

from .. import _io
from .._util import git_commit  # noqa: F401  (re-exported for the benchmarks)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


# Environment variables that change a CPU benchmark's speed (ours or a peer's): the
# extension's switches, the C library's allocator (whether freed large blocks stay mapped
# decides how many page faults a step takes - PyG's most of all), torch's huge-page
# allocation, the thread pools, a preloaded allocator.
_SPEED_ENV = ("NEPTUNE_", "GLIBC_TUNABLES", "MALLOC_", "THP_MEM_ALLOC_ENABLE", "OMP_", "MKL_",
              "KMP_", "LD_PRELOAD")


def speed_environment() -> dict:
    """What a recorded figure depends on beyond the code and the machine: the environment
    variables of _SPEED_ENV that are set, and the kernel's transparent huge page mode."""
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith(_SPEED_ENV)}
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            env["transparent_hugepage"] = f.read().strip()
    except OSError:
        pass
    return env


def write_json(path, report, quiet: bool = False) -> None:
    """``report`` as indented JSON at ``path`` (when a path is given, atomically), and say so.
    A report (a dict) without an ``environment`` gets :func:`speed_environment`'s (in place:
    what the caller returns is what was written)."""
    if path:
        if isinstance(report, dict):
            report.setdefault("environment", speed_environment())
        _io.write_json(path, report)
        if not quiet:
            print(f"wrote {path}")


def cuda_median_ms(fn: Callable[[], object], warmup: int = 5, repeats: int = 20) -> float:
    """Median milliseconds of fn on the current CUDA stream, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    ms = []
    for _ in range(repeats):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize()
        ms.append(e0.elapsed_time(e1))
    return statistics.median(ms)


def power_law_graph(n: int, n_edges: int, alpha: float = 1.2, seed: int = 0) -> torch.Tensor:
    """[2, E] edges whose in-degrees follow a Zipf-like law (hubs), sources uniform."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    w = ranks.pow(-alpha)
    dst = torch.multinomial(w, n_edges, replacement=True, generator=g)
    dst = torch.randperm(n, generator=g)[dst]
    src = torch.randint(0, n, (n_edges,), generator=g)
    return torch.stack([src, dst])


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def alternate(contenders: Dict[str, Callable[[], Dict[str, float]]], repeats: int,
              warmup: int = 1, progress: bool = True) -> Dict[str, Dict[str, List[float]]]:
    """Run every contender `warmup` times, then `repeats` rounds of A, B, A, B...
    Each callable returns {phase: seconds}; returns {name: {phase: [seconds...]}}."""
    for name, fn in contenders.items():
        for _ in range(warmup):
            fn()
    out: Dict[str, Dict[str, List[float]]] = {name: {} for name in contenders}
    for r in range(repeats):
        for name, fn in contenders.items():
            for phase, sec in fn().items():
                out[name].setdefault(phase, []).append(sec)
        if progress:
            print(f"  round {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    return out


def median_ms(values: Sequence[float]) -> float:
    return 1e3 * statistics.median(values)


# ----------------------------------------------------------------- memory (CPU)
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak resident memory added while `fn` runs (Linux: reset VmHWM, run, read it).
    Run under MALLOC_MMAP_THRESHOLD_ so freed blocks go back to the OS (see run_isolated).
    The kernels' cache of large CPU buffers is emptied first, so memory it held from earlier
    calls is not counted as free for `fn` (neptune_ext.backend.empty_cpu_cache)."""
    import gc
    gc.collect()
    from neptune_ext import backend
    backend.empty_cpu_cache()
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    result = fn()
    peak = _status_kb("VmHWM")
    del result
    return max(0, peak - before) * 1024


def run_isolated(module: str, args: Sequence[str]) -> dict:
    """Run `python -m module args...` in a fresh process and parse its last stdout line (JSON)."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "0")
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    if isinstance(n, str):
        return n
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_table(rows: List[List[str]], header: List[str], file=None):
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"
    print(line, file=file)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=file)
    for r in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |", file=file)


def timed(fn: Callable[[], object], device: str = "cpu"):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


