"""Large CPU kernel buffers on huge-page mappings (csrc/memory/cpu_alloc.h): the outputs of
the attention kernels of 2 MiB or more come from 2 MiB-aligned mappings advised for
transparent huge pages, give the same bits as at::empty's memory (NEPTUNE_CPU_HUGEPAGES=0),
resize and free like any tensor, and the switch turns them off."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from neptune_ext import backend

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge-page mappings are Linux only"),
    pytest.mark.skipif(not backend.runs_kernel("gat_forward", "cpu"), reason="the extension is not built"),
]

HUGE = 2 << 20

# One fused-attention step of each kernel family whose outputs are at least 2 MiB, run in a
# fresh process (the switch is read once per process). It saves every output and gradient,
# and reports for each whether its memory starts on a 2 MiB boundary and whether the kernel
# marked its mapping eligible for huge pages (/proc/self/smaps).
SCRIPT = textwrap.dedent(r"""
    import json, sys
    import torch
    from neptune_ext import Graph
    from neptune_ext.ops import gatv2_attention, sparse_graph_attention, transformer_attention

    def eligible(t):
        p = t.data_ptr()
        cur = None
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split()[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(v, 16) for v in head.split("-"))
                    cur = lo <= p < hi
                elif cur and line.startswith("THPeligible:"):
                    return line.split()[1] == "1"
        return None

    torch.manual_seed(int(sys.argv[2]))
    N, E, H, C = 6000, 60000, 4, 64          # [N, H, C] float32: 6.1 MB
    ei = torch.randint(0, N, (2, E))
    g = Graph.from_edge_index(ei, (N, N))
    h = torch.randn(N, H, C, requires_grad=True)
    ss = torch.randn(N, H, requires_grad=True)
    sd = torch.randn(N, H, requires_grad=True)
    q, k, v = (torch.randn(N, H, C, requires_grad=True) for _ in range(3))
    res, info = {}, {"enabled": bool(torch.ops.neptune.cpu_hugepages())}
    out = sparse_graph_attention(h, ss, sd, g)
    out.sum().backward()                    # an expanded grad: the autograd copy is large too
    xl, xr = (torch.randn(N, H, C, requires_grad=True) for _ in range(2))
    v2 = gatv2_attention(xl, xr, torch.randn(H, C), g)
    v2.backward(torch.randn_like(v2))
    t = transformer_attention(q, k, v, g)
    t.backward(torch.randn_like(t))
    for name, x in [("gat_out", out), ("gat_grad_h", h.grad), ("tr_out", t), ("tr_grad_q", q.grad),
                    ("tr_grad_k", k.grad), ("tr_grad_v", v.grad), ("v2_out", v2),
                    ("v2_grad_l", xl.grad), ("v2_grad_r", xr.grad)]:
        res[name] = x.detach().clone()
        info[name] = {"aligned": x.data_ptr() % (2 << 20) == 0, "eligible": eligible(x)}
    res["gat_grad_ss"], res["gat_grad_sd"] = ss.grad, sd.grad
    torch.save(res, sys.argv[1])
    print(json.dumps(info))
""")


def _run(tmp_path, name, seed, off):
    env = dict(os.environ)
    env.pop("NEPTUNE_CPU_HUGEPAGES", None)
    if off:
        env["NEPTUNE_CPU_HUGEPAGES"] = "0"
    path = tmp_path / f"{name}.pt"
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(path), str(seed)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), torch.load(path, weights_only=True)


def _thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read()
    except OSError:
        return "[never]"


def test_huge_page_buffers_give_the_same_bits(tmp_path):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    on_info, on = _run(tmp_path, "on", seed, off=False)
    off_info, off = _run(tmp_path, "off", seed, off=True)
    assert on.keys() == off.keys()
    for name in on:
        assert torch.equal(on[name], off[name]), name
    assert not off_info.pop("enabled")
    assert on_info.pop("enabled") == ("[never]" not in _thp_mode())
    for name, i in off_info.items():
        assert not i["aligned"], f"{name}: NEPTUNE_CPU_HUGEPAGES=0 still mapped it"
    if "[never]" in _thp_mode():
        return
    for name, i in on_info.items():
        assert i["aligned"], f"{name}: a {on[name].nbytes}-byte kernel output is not on a huge-page mapping"
        if i["eligible"] is not None:  # kernels before 5.x have no THPeligible field
            assert i["eligible"], f"{name}: its mapping is not eligible for huge pages"


def _rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_huge_page_tensors_resize_and_free():
    from neptune_ext import Graph
    from neptune_ext.ops import sparse_graph_attention
    N, H, C = 4000, 4, 64
    g = Graph.from_edge_index(torch.randint(0, N, (2, 20000)), (N, N))
    h, ss, sd = torch.randn(N, H, C), torch.randn(N, H), torch.randn(N, H)
    out = sparse_graph_attention(h, ss, sd, g)
    assert out.nbytes >= HUGE
    keep = out.clone()
    out.resize_(2 * N, H, C)  # a larger storage from the same allocator, the prefix kept
    assert torch.equal(out[:N], keep)
    out.resize_(N // 2, H, C)
    assert torch.equal(out, keep[:N // 2])
    # every mapping is returned on free: 60 calls of 4 MB each leave the resident set where it was
    sparse_graph_attention(h, ss, sd, g)
    before = _rss_kb()
    for _ in range(60):
        sparse_graph_attention(h, ss, sd, g)
    assert _rss_kb() - before < 64 * 1024
