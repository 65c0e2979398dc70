"""The CUDA graph-attention kernels, run on the CPU by tests/cuda_emulation.

csrc/graph_attention/graph_attention_{fwd,bwd}_cuda.cu are compiled as C++ against a small
emulator (each warp's 32 lanes run as fibers, shuffles are real rendezvous), so
the kernels' own code - lane layouts, vector paths, the hub-splitting record tree,
the two backward passes - is executed and checked against the float64 reference
and the CPU kernel on every machine, GPU or not. Two builds: the real constants,
and a "deep" one (leaf segments of 4 edges, fan-in 2) in which small graphs
already need many record levels. Outputs and scratch start as NaN, so anything
left unwritten shows. What this cannot show (races between warps, timing, the
real memory system) is left to tests/test_graph_attention_cuda.py on a GPU.
"""
import os
import sys

import pytest
import torch

import neptune_ext
from neptune_ext import Graph
from graph_attention_checks import TOL_OUT, check_results, rel_err
from graphs import cases, hub_graph, power_law_graph, random_graph

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emulation"))
import build as emulation  # noqa: E402

pytestmark = pytest.mark.slow

def _load(variant):
    from torch.utils import cpp_extension
    if os.environ.get("NEPTUNE_SKIP_EMULATION", "0") == "1":
        pytest.skip("NEPTUNE_SKIP_EMULATION=1")
    if not cpp_extension.is_ninja_available():
        pytest.skip("ninja is needed to build the CUDA emulation")
    return emulation.load(variant)


@pytest.fixture(scope="module", params=["default", "deep"])
def emu(request):
    return _load(request.param)


@pytest.fixture(scope="module")
def deep():
    return _load("deep")


def make_inputs(n_src, n_dst, E, H, C, dtype, edge_logits=True):
    def r(*shape):
        return torch.randn(*shape, dtype=torch.float64).to(dtype)
    return r(n_src, H, C), r(n_src, H), r(n_dst, H), (r(E, H) if edge_logits else None)


def run(ops, g, h, ss, sd, el, go=None, slope=0.2, p=0.0, seed=None):
    args = (h, ss, sd, g.rowptr, g.col, g.eid, *g.csc(), el, slope, p, seed)
    out, lse = ops.gat_forward(*args)
    if go is None:
        go = torch.randn(out.shape, dtype=torch.float64).to(out.dtype)
    grads = ops.gat_backward(go, h, ss, sd, g.rowptr, g.col, g.eid, *g.csc(), el, out, lse, slope,
                             p, seed)
    for name, t in zip(("out", "lse", "grad_h", "grad_score_src", "grad_score_dst", "grad_edge_logits"),
                       (out, lse) + tuple(grads)):
        assert not torch.isnan(t).any(), f"{name}: elements left unwritten (NaN poison)"
    return out, lse, list(grads), go


def check(ops, g, H, C, dtype, edge_logits=True, p=0.0, slope=0.2, h=None):
    ins = make_inputs(g.num_src, g.num_dst, g.num_edges, H, C, dtype, edge_logits)
    if h is not None:
        ins = (h,) + ins[1:]
    h, ss, sd, el = ins
    seed = torch.tensor(4321) if p > 0 else None
    out, lse, grads, go = run(ops, g, h, ss, sd, el, slope=slope, p=p, seed=seed)
    check_results(g, dtype, (h, ss, sd, el), out, grads[:4 if el is not None else 3], go, slope, p,
                  seed)
    if neptune_ext._ext._C is not None:  # the CPU kernel: same semantics, lse included
        c_out, c_lse = torch.ops.neptune.gat_forward(h, ss, sd, g.rowptr, g.col, g.eid, *g.csc(), el,
                                                     slope, p, seed)
        tol = 1e-12 if dtype == torch.float64 else TOL_OUT[dtype]
        assert rel_err(lse, c_lse) <= tol
    return out, lse, grads


def as_int64(g):
    out = Graph(g.rowptr.long(), g.col.long(), g.eid.long(), g.edge_index, g.num_src, g.num_dst)
    out._csc = tuple(t.long() for t in g.csc())
    return out


def degree_graph(degrees, n_src=97):
    deg = torch.tensor(degrees, dtype=torch.int64)
    dst = torch.repeat_interleave(torch.arange(len(degrees)), deg)
    src = torch.randint(0, n_src, (dst.numel(),))
    perm = torch.randperm(dst.numel())
    return Graph.from_edge_index(torch.stack([src[perm], dst[perm]]), (n_src, len(degrees)))


# ---------------------------------------------------------------- semantics

@pytest.mark.parametrize("name", list(cases()))
@pytest.mark.parametrize("index", ["int32", "int64"])
def test_cases_float64(emu, name, index):
    ei, n_src, n_dst = cases()[name]
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    if index == "int64":
        g = as_int64(g)
    check(emu, g, 3, 7, torch.float64)                     # scalar path
    check(emu, g, 2, 4, torch.float64, edge_logits=False)  # fp64 uses scalars too
    check(emu, g, 2, 8, torch.float32, p=0.3)              # 16-byte vectors, dropout


@pytest.mark.parametrize("H,C", [(1, 1), (3, 7), (8, 3), (4, 64), (4, 32), (16, 64), (12, 96),
                                 (1, 600), (2, 1000), (5, 130), (2, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_layouts(emu, H, C, dtype):
    ei, n_src, n_dst = random_graph(40, 30, 200)
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    check(emu, g, H, C, dtype)


def test_dropout_mask_matches_reference(emu):
    ei, n_src, n_dst = random_graph(30, 20, 300)
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    for p in (0.1, 0.5, 0.9):
        check(emu, g, 3, 8, torch.float64, p=p, slope=0.05)


# ---------------------------------------------------------------- hub split

def test_degree_boundaries_deep_tree(deep):
    """Leaf 4, fan-in 2: degrees around 4 * 2^k, so every level's boundaries are hit."""
    degrees = [0, 1, 3, 4, 5, 0, 7, 8, 9, 15, 16, 17, 0, 31, 32, 33, 63, 64, 65, 127, 128, 129,
               255, 256, 257, 2, 600, 1]
    g = degree_graph(degrees)
    check(deep, g, 2, 4, torch.float64)
    check(deep, g, 3, 8, torch.float32, p=0.2)
    check(deep, g, 4, 64, torch.bfloat16)
    rev = Graph.from_edge_index(g.edge_index.flip(0), (g.num_dst, g.num_src))  # source hubs
    check(deep, rev, 2, 4, torch.float64)


def test_degree_boundaries_real_constants():
    ops = _load("default")
    degrees = [0, 1, 255, 256, 257, 0, 3, 511, 512, 513, 1200, 2]
    g = degree_graph(degrees, n_src=300)
    check(ops, g, 2, 4, torch.float64)
    check(ops, g, 3, 8, torch.float32)


def test_hub_beyond_the_first_merge_level():
    """Real constants: 9000 in-edges on one row needs the second record level (E > 256 * 32)."""
    ops = _load("default")
    ei, n, _ = hub_graph(n_hub_edges=9000, n_other=300)
    g = Graph.from_edge_index(ei, (n, n))
    check(ops, g, 1, 4, torch.float64)


def test_power_law_hubs_both_ways(deep):
    ei, n, _ = power_law_graph(300, 3000, alpha=1.5)
    ei = torch.cat([ei, ei.flip(0)], 1)
    g = Graph.from_edge_index(ei, (n, n))
    check(deep, g, 2, 8, torch.float32, p=0.1)
    check(deep, g, 4, 16, torch.float16)


# ---------------------------------------------------------------- layouts of memory

def test_misaligned_h_takes_scalar_path(emu):
    ei, n_src, n_dst = random_graph(30, 20, 150)
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    H, C = 2, 8
    flat = torch.randn(n_src * H * C + 1)
    h_odd = flat[1:].view(n_src, H, C)
    assert h_odd.data_ptr() % 16 != 0
    check(emu, g, H, C, torch.float32, h=h_odd)


def test_int32_int64_bitwise_and_repeatable(emu):
    ei, n, _ = power_law_graph(200, 2000)
    g = Graph.from_edge_index(ei, (n, n))
    g64 = as_int64(g)
    h, ss, sd, el = make_inputs(n, n, g.num_edges, 4, 16, torch.float32)
    seed = torch.tensor(8)
    a = run(emu, g, h, ss, sd, el, p=0.2, seed=seed)
    b = run(emu, g64, h, ss, sd, el, go=a[3], p=0.2, seed=seed)
    c = run(emu, g, h, ss, sd, el, go=a[3], p=0.2, seed=seed)
    for x, y, z in zip([a[0], a[1]] + a[2], [b[0], b[1]] + b[2], [c[0], c[1]] + c[2]):
        assert torch.equal(x, y) and torch.equal(x, z)


def test_empty_sizes(emu):
    H, C = 3, 8
    for n_src, n_dst in ((6, 5), (4, 0), (0, 4), (0, 0)):
        g = Graph.from_edge_index(torch.empty(2, 0, dtype=torch.int64), (n_src, n_dst))
        h, ss, sd, el = make_inputs(n_src, n_dst, 0, H, C, torch.float32)
        out, lse, grads, _ = run(emu, g, h, ss, sd, el)
        assert out.shape == (n_dst, H, C) and torch.equal(out, torch.zeros_like(out))
        assert torch.equal(lse, torch.zeros_like(lse))
        for t, ref in zip(grads, (h, ss, sd, el)):
            assert t.shape == ref.shape and torch.equal(t, torch.zeros_like(t))
