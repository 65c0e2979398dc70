"""The cache of the kernels' large CPU buffers (csrc/memory/cpu_alloc.h): attention outputs,
gradients and scratch of 2 MiB or more reuse the mappings of freed ones, give the same bits
as without the cache (NEPTUNE_CPU_CACHE_MB=0), resize and free like any tensor, and the
cache never holds more than its limit; clearing it returns everything."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from neptune_ext import backend

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the buffer cache is Linux only"),
    pytest.mark.skipif(not backend.runs_kernel("gat_forward", "cpu"), reason="the extension is not built"),
]

MB = 1 << 20

# Two steps of each kernel family and layer, with outputs of 2 MiB or more, in a fresh process
# (the limit is read once per process); the first step's results are overwritten with NaN
# before they are freed, so the second step's buffers start as NaN where they are reused. It
# saves every output and gradient of the second step and reports the cache's [limit, held]
# after each step.
SCRIPT = textwrap.dedent(r"""
    import json, sys
    import torch
    from neptune_ext import Graph
    from neptune_ext.nn import GraphAttention, GraphAttentionV2, GraphTransformer
    from neptune_ext.ops import gatv2_attention, sparse_graph_attention, transformer_attention

    torch.manual_seed(int(sys.argv[2]))
    N, E, H, C = 6000, 60000, 4, 64          # [N, H, C] float32: 6.1 MB
    # sources 4000.. send nothing and destinations ..999 receive nothing: rows the kernels
    # must write as zeros themselves (a reused mapping holds the last tensor's bytes)
    ei = torch.stack([torch.randint(0, 4000, (E,)), torch.randint(1000, N, (E,))])
    g = Graph.from_edge_index(ei, (N, N))
    inputs = [torch.randn(N, H, C) for _ in range(6)] + [torch.randn(N, H) for _ in range(2)]
    att, go = torch.randn(H, C), torch.randn(N, H, C)
    x, ea = torch.randn(N, 64), torch.randn(E, 8)
    layers = [cls(64, C, heads=H, edge_dim=8) for cls in (GraphAttention, GraphAttentionV2, GraphTransformer)]
    info = []

    def step():
        h, q, k, v, xl, xr, ss, sd = (t.clone().requires_grad_() for t in inputs)
        out = sparse_graph_attention(h, ss, sd, g)
        out.sum().backward()                # an expanded grad: the autograd copy is large too
        t = transformer_attention(q, k, v, g)
        t.backward(go)
        v2 = gatv2_attention(xl, xr, att, g)
        v2.backward(go)
        res = {"gat_out": out, "gat_grad_h": h.grad, "gat_grad_ss": ss.grad, "gat_grad_sd": sd.grad,
               "tr_out": t, "tr_grad_q": q.grad, "tr_grad_k": k.grad, "tr_grad_v": v.grad,
               "v2_out": v2, "v2_grad_l": xl.grad, "v2_grad_r": xr.grad}
        for layer in layers:                # GATConv's self loops (a phantom row), edge features
            layer.zero_grad()
            y = layer(x, ei, ea)
            y.sum().backward()
            name = type(layer).__name__
            res[name] = y
            res.update({f"{name}.{p}": w.grad for p, w in layer.named_parameters()})
        return res

    first = step()
    info.append(torch.ops.neptune.cpu_cache_info())
    for t in first.values():                # what the next step's reused mappings will hold
        t.detach().fill_(float("nan"))
    del first
    res = {k: v.detach().clone() for k, v in step().items()}
    info.append(torch.ops.neptune.cpu_cache_info())
    torch.save(res, sys.argv[1])
    print(json.dumps(info))
""")



def _run(tmp_path, name, seed, limit_mb):
    env = dict(os.environ)
    env.pop("NEPTUNE_CPU_CACHE_MB", None)
    if limit_mb is not None:
        env["NEPTUNE_CPU_CACHE_MB"] = str(limit_mb)
    path = tmp_path / f"{name}.pt"
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(path), str(seed)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), torch.load(path, weights_only=True)


def test_cached_buffers_give_the_same_bits(tmp_path):
    """Reused mappings hold the last tensor's bytes: every kernel writes all of its output."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    on_info, on = _run(tmp_path, "on", seed, None)
    off_info, off = _run(tmp_path, "off", seed, 0)
    small_info, small = _run(tmp_path, "small", seed, 8)
    assert on.keys() == off.keys() == small.keys()
    for name in on:
        assert torch.equal(on[name], off[name]), name
        assert torch.equal(small[name], off[name]), name
    assert off_info == [[0, 0], [0, 0]]
    assert on_info[0][0] == 256 * MB
    assert 6 * MB < on_info[0][1] <= 256 * MB  # the first step's freed buffers are kept
    assert small_info[0][0] == 8 * MB and all(held <= 8 * MB for _, held in small_info)


def test_freed_buffers_are_reused_and_cleared():
    from neptune_ext import Graph
    from neptune_ext.ops import sparse_graph_attention
    limit, _ = torch.ops.neptune.cpu_cache_info()
    if limit == 0:
        pytest.skip("NEPTUNE_CPU_CACHE_MB=0 in this environment")
    N, H, C = 4000, 4, 64
    g = Graph.from_edge_index(torch.randint(0, N, (2, 20000)), (N, N))
    h, ss, sd = torch.randn(N, H, C), torch.randn(N, H), torch.randn(N, H)
    torch.ops.neptune.cpu_cache_clear()
    out = sparse_graph_attention(h, ss, sd, g)
    assert out.nbytes >= 2 * MB
    ptr, expect = out.data_ptr(), out.clone()
    del out
    assert torch.ops.neptune.cpu_cache_info()[1] >= expect.nbytes  # kept, not unmapped
    again = sparse_graph_attention(h, ss, sd, g)
    assert again.data_ptr() == ptr and torch.equal(again, expect)  # the same pages, new values
    assert torch.ops.neptune.cpu_cache_clear() == 0  # nothing free while `again` holds it
    del again
    assert backend.cpu_cache_info()["held"] >= expect.nbytes
    assert backend.empty_cpu_cache() >= expect.nbytes
    assert backend.cpu_cache_info() == {"limit": limit, "held": 0}


def _rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_cached_tensors_resize_and_free():
    from neptune_ext import Graph
    from neptune_ext.ops import sparse_graph_attention
    N, H, C = 4000, 4, 64
    g = Graph.from_edge_index(torch.randint(0, N, (2, 20000)), (N, N))
    h, ss, sd = torch.randn(N, H, C), torch.randn(N, H), torch.randn(N, H)
    out = sparse_graph_attention(h, ss, sd, g)
    keep = out.clone()
    out.resize_(2 * N, H, C)  # a larger storage from the same allocator, the prefix kept
    assert torch.equal(out[:N], keep)
    out.resize_(N // 2, H, C)
    assert torch.equal(out, keep[:N // 2])
    del out
    # 60 calls of 4 MB each: memory comes back to the cache (within its limit), not leaked
    sparse_graph_attention(h, ss, sd, g)
    before = _rss_kb()
    for i in range(60):
        sparse_graph_attention(h[: N - 7 * i], ss[: N - 7 * i], sd[: N - 7 * i],
                               Graph.from_edge_index(torch.randint(0, N - 7 * i, (2, 20000)),
                                                     (N - 7 * i, N - 7 * i)))
    limit, held = torch.ops.neptune.cpu_cache_info()
    assert held <= limit
    assert _rss_kb() - before < (limit // 1024) + 64 * 1024


def _child_step(q):
    torch.set_num_threads(1)  # as DataLoader's workers: OpenMP's pool does not survive a fork
    from neptune_ext import Graph
    from neptune_ext.ops import sparse_graph_attention
    torch.manual_seed(1)
    N = 4000
    g = Graph.from_edge_index(torch.randint(0, N, (2, 20000)), (N, N))
    out = sparse_graph_attention(torch.randn(N, 4, 64), torch.randn(N, 4), torch.randn(N, 4), g)
    q.put(float(out.double().sum()))


def test_a_forked_child_has_its_own_cache():
    """DataLoader workers fork: the child allocates, frees and reuses buffers of its own."""
    import multiprocessing as mp
    from neptune_ext import Graph
    from neptune_ext.ops import sparse_graph_attention
    N = 4000
    g = Graph.from_edge_index(torch.randint(0, N, (2, 20000)), (N, N))
    held = sparse_graph_attention(torch.randn(N, 4, 64), torch.randn(N, 4), torch.randn(N, 4), g)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_step, args=(q,))
    p.start()
    got = q.get(timeout=120)
    p.join(timeout=60)
    assert p.exitcode == 0
    torch.manual_seed(1)
    g = Graph.from_edge_index(torch.randint(0, N, (2, 20000)), (N, N))
    want = sparse_graph_attention(torch.randn(N, 4, 64), torch.randn(N, 4), torch.randn(N, 4), g)
    assert got == float(want.double().sum())
    del held
