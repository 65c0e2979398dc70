"""Measuring on a GPU for the GPU benchmarks: forward/backward times from CUDA events,
the peak memory one step adds, copy bandwidth, out-of-memory detection."""
import gc
import statistics

import torch

from .common import cuda_median_ms


def is_oom(exc):
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free():
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def time_fwd_bwd(fwd, leaves, grad, warmup, repeats):
    """Median forward and backward milliseconds (CUDA events around each)."""
    def step():
        for t in leaves:
            t.grad = None
        out = fwd()
        out.backward(grad)

    for _ in range(warmup):
        step()
    f_ms, b_ms = [], []
    for _ in range(repeats):
        for t in leaves:
            t.grad = None
        e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        e0.record()
        out = fwd()
        e1.record()
        out.backward(grad)
        e2.record()
        torch.cuda.synchronize()
        f_ms.append(e0.elapsed_time(e1))
        b_ms.append(e1.elapsed_time(e2))
        del out
    return statistics.median(f_ms), statistics.median(b_ms), [a + b for a, b in zip(f_ms, b_ms)]


def peak_bytes(fwd, leaves, grad):
    """Peak memory one forward + backward adds to what is already allocated."""
    for t in leaves:
        t.grad = None
    free()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fwd()
    out.backward(grad)
    del out
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for t in leaves:
        t.grad = None
    return int(peak)


def time_ms(fn, warmup, repeats):
    return cuda_median_ms(fn, warmup, repeats)


def copy_bandwidth(nbytes=2 << 30, repeats=20):
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), 3, repeats)
    del src, dst
    free()
    return 2 * nbytes / (ms * 1e-3)
