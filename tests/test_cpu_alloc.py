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
# (the limit is read once per process). The first runs on other inputs and its results are
# overwritten with NaN before they are freed, so the second step's buffers start with other
# bytes where they are reused (scratch included). It saves every output and gradient of the
# second step and reports the cache's [limit, held] after each step.
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
    def draw():
        return ([torch.randn(N, H, C) for _ in range(6)] + [torch.randn(N, H) for _ in range(2)],
                torch.randn(N, 64), torch.randn(E, 8))
    other, inputs = draw(), draw()          # the first step runs on other inputs
    att, go = torch.randn(H, C), torch.randn(N, H, C)
    layers = [cls(64, C, heads=H, edge_dim=8) for cls in (GraphAttention, GraphAttentionV2, GraphTransformer)]
    info = []

    def step(drawn):
        nodes, x, ea = drawn
        h, q, k, v, xl, xr, ss, sd = (t.clone().requires_grad_() for t in nodes)
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

    first = step(other)
    info.append(torch.ops.neptune.cpu_cache_info())
    for t in first.values():                # what the next step's reused mappings will hold
        t.detach().fill_(float("nan"))
    del first
    res = {k: v.detach().clone() for k, v in step(inputs).items()}
    info.append(torch.ops.neptune.cpu_cache_info())
    torch.save(res, sys.argv[1])
    print(json.dumps(info))
""")



# The layers the way users call them, with kernel buffers of 2 MiB or more: under bf16
# autocast (the kernels run in bf16: 3 MB outputs and gradients) and GraphAttention compiled
# with fullgraph=True, two steps each (the second reuses the first's freed buffers).
USER_PATHS_SCRIPT = textwrap.dedent(r"""
    import json, sys
    import torch
    from neptune_ext.nn import GraphAttention, GraphAttentionV2, GraphTransformer

    torch.manual_seed(int(sys.argv[2]))
    N, E, H, C = 6000, 60000, 4, 64          # [N, H * C] bf16: 3 MB; float32: 6.1 MB
    ei = torch.stack([torch.randint(0, 4000, (E,)), torch.randint(1000, N, (E,))])
    x, ea = torch.randn(N, 64), torch.randn(E, 8)
    layers = [cls(64, C, heads=H, edge_dim=8) for cls in (GraphAttention, GraphAttentionV2, GraphTransformer)]
    compiled = torch.compile(GraphAttention(64, C, heads=H, edge_dim=8), fullgraph=True)
    res = {}
    for it in range(2):
        for layer in layers:
            layer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = layer(x, ei, ea)
            y.sum().backward()
            name = "autocast." + type(layer).__name__
            res[name] = y.detach().clone()
            res.update({f"{name}.{p}": w.grad.clone() for p, w in layer.named_parameters()})
            del y
        compiled.zero_grad()
        y = compiled(x, ei, ea)
        y.sum().backward()
        res["compiled"] = y.detach().clone()
        res.update({f"compiled.{p}": w.grad.clone() for p, w in compiled.named_parameters()})
        del y
    torch.save(res, sys.argv[1])
    print(json.dumps([torch.ops.neptune.cpu_cache_info()]))
""")


def _run(tmp_path, name, seed, limit_mb, poison=False, script=SCRIPT):
    env = dict(os.environ)
    env.pop("NEPTUNE_CPU_CACHE_MB", None)
    env.pop("NEPTUNE_CPU_CACHE_POISON", None)
    if poison:  # every buffer it hands out, new or reused, starts as 0xFF bytes (NaN, -1)
        env["NEPTUNE_CPU_CACHE_POISON"] = "1"
    if limit_mb is not None:
        env["NEPTUNE_CPU_CACHE_MB"] = str(limit_mb)
    path = tmp_path / f"{name}.pt"
    r = subprocess.run([sys.executable, "-c", script, str(path), str(seed)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), torch.load(path, weights_only=True)


def test_cached_buffers_give_the_same_bits(tmp_path):
    """Reused mappings hold the last tensor's bytes: every kernel writes all of its output and
    reads none of its scratch before writing it."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    on_info, on = _run(tmp_path, "on", seed, None)
    poisoned_info, poisoned = _run(tmp_path, "poisoned", seed, None, poison=True)
    off_info, off = _run(tmp_path, "off", seed, 0)
    small_info, small = _run(tmp_path, "small", seed, 8)
    assert on.keys() == off.keys() == small.keys()
    for name in on:
        assert torch.equal(on[name], off[name]), name
        assert torch.equal(small[name], off[name]), name
        assert torch.equal(poisoned[name], off[name]), name
    assert off_info == [[0, 0], [0, 0]]
    assert on_info[0][0] == 256 * MB
    assert 6 * MB < on_info[0][1] <= 256 * MB  # the first step's freed buffers are kept
    assert small_info[0][0] == 8 * MB and all(held <= 8 * MB for _, held in small_info)


def test_cached_buffers_under_autocast_and_compile(tmp_path):
    """The user's paths through the cache: bf16 autocast and a fullgraph-compiled layer give
    the same bits with every buffer poisoned as without the cache."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    on_info, on = _run(tmp_path, "poisoned", seed, None, poison=True, script=USER_PATHS_SCRIPT)
    _, off = _run(tmp_path, "off", seed, 0, script=USER_PATHS_SCRIPT)
    assert on.keys() == off.keys() and "compiled" in on
    for name in on:
        assert torch.equal(on[name], off[name]), name
    assert on_info[0][1] > 2 * MB  # the cache was in use


def test_freed_buffers_are_reused_and_cleared():
    from neptune_ext import Graph
    from neptune_ext.ops import sparse_graph_attention
    limit, _ = torch.ops.neptune.cpu_cache_info()
    if limit < 8 * MB:
        pytest.skip("NEPTUNE_CPU_CACHE_MB is under 8 in this environment")
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
    from neptune_app.bench.common import _status_kb
    return _status_kb("VmRSS")


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
    if torch.ops.neptune.cpu_cache_info()[0] < 8 * MB:
        return
    # 60 calls of about 4 MB each, a little smaller every time: each output takes the mapping
    # the one before freed; the resident set stays where it was
    sparse_graph_attention(h, ss, sd, g)
    before, ptrs = _rss_kb(), set()
    for i in range(60):
        n = N - 7 * i
        o = sparse_graph_attention(h[:n], ss[:n], sd[:n],
                                   Graph.from_edge_index(torch.randint(0, n, (2, 20000)), (n, n)))
        ptrs.add(o.data_ptr())
        del o
    limit, held = torch.ops.neptune.cpu_cache_info()
    assert held <= limit
    assert len(ptrs) <= 2, f"{len(ptrs)} different mappings for 60 outputs in a row"
    assert _rss_kb() - before < 16 * 1024


def _child_step(q):
    torch.set_num_threads(1)  # as DataLoader's workers: OpenMP's pool does not survive a fork
    from neptune_ext import Graph
    from neptune_ext.ops import sparse_graph_attention
    torch.manual_seed(1)
    N = 4000
    g = Graph.from_edge_index(torch.randint(0, N, (2, 20000)), (N, N))
    out = sparse_graph_attention(torch.randn(N, 4, 64), torch.randn(N, 4), torch.randn(N, 4), g)
    q.put((float(out.double().sum()), torch.ops.neptune.cpu_cache_info()[1]))


def test_a_forked_child_has_its_own_cache():
    """DataLoader workers fork: the child allocates, frees and reuses buffers of its own."""
    import multiprocessing as mp
    from neptune_ext import Graph
    from neptune_ext.ops import sparse_graph_attention
    N = 4000
    g = Graph.from_edge_index(torch.randint(0, N, (2, 20000)), (N, N))
    held = sparse_graph_attention(torch.randn(N, 4, 64), torch.randn(N, 4), torch.randn(N, 4), g)
    freed = sparse_graph_attention(torch.randn(N, 4, 64), torch.randn(N, 4), torch.randn(N, 4), g)
    del freed
    cached = torch.ops.neptune.cpu_cache_info()[1]
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_step, args=(q,))
    p.start()
    got, child_held_after = q.get(timeout=120)
    p.join(timeout=60)
    assert p.exitcode == 0
    torch.manual_seed(1)
    g = Graph.from_edge_index(torch.randint(0, N, (2, 20000)), (N, N))
    want = sparse_graph_attention(torch.randn(N, 4, 64), torch.randn(N, 4), torch.randn(N, 4), g)
    assert got == float(want.double().sum())
    if cached:  # the child began with an empty cache: it holds what it freed itself, no more
        assert child_held_after <= held.nbytes + 4096
    del held


def test_traced_backward_with_an_expanded_grad():
    """make_fx / torch.compile trace the backward on fake tensors: a large expanded grad_out
    (from a sum) must be made dense through the dispatcher, not by the cache."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from neptune_ext import Graph
    N, H, C = 8192, 4, 16                   # [N, H, C] float32: 2 MiB, the cache's threshold
    g = Graph.from_edge_index(torch.randint(0, N, (2, 40000)), (N, N))
    graph = (g.rowptr, g.col, g.eid, *g.csc())

    def f(h, ss, sd, *graph):
        h = h.requires_grad_()
        out = torch.ops.neptune.gat_forward(h, ss, sd, *graph, None, 0.2, 0.0, None)[0]
        return torch.autograd.grad(out.sum(), [h])[0]

    h, ss, sd = torch.randn(N, H, C), torch.randn(N, H), torch.randn(N, H)
    gm = make_fx(f, tracing_mode="fake")(h, ss, sd, *graph)
    assert torch.equal(gm(h.clone(), ss, sd, *graph), f(h.clone(), ss, sd, *graph))
