"""The CUDA GAT kernels, run on the CPU by tests/cuda_emulation: what GAT alone has - the
hub-splitting record tree (rows split across warps, merged level by level) and the vector
paths' alignment. Two builds: the real constants, and a "deep" one (leaf segments of 4
edges, fan-in 2) in which small graphs already need many record levels. What every
variant's kernels have (cases, layouts, dropout, index types, empty sizes) is in
test_attention_cuda_emulated.py; races between warps, timing and the real memory system
are left to tests/test_graph_attention_cuda.py on a GPU.
"""
import pytest
import torch

from neptune_ext import Graph

import emulated_attention as emulated
from attention_variants import GAT
from emulated_attention import inputs
from graphs import hub_graph, power_law_graph, random_graph

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def emu():
    return emulated.load("default")


@pytest.fixture(scope="module")
def deep():
    return emulated.load("deep")


def check(ops, g, H, C, dtype, **kw):
    return emulated.check(ops, GAT, g, H, C, dtype, **kw)


def degree_graph(degrees, n_src=97):
    deg = torch.tensor(degrees, dtype=torch.int64)
    dst = torch.repeat_interleave(torch.arange(len(degrees)), deg)
    src = torch.randint(0, n_src, (dst.numel(),))
    perm = torch.randperm(dst.numel())
    return Graph.from_edge_index(torch.stack([src[perm], dst[perm]]), (n_src, len(degrees)))


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


def test_degree_boundaries_real_constants(emu):
    degrees = [0, 1, 255, 256, 257, 0, 3, 511, 512, 513, 1200, 2]
    g = degree_graph(degrees, n_src=300)
    check(emu, g, 2, 4, torch.float64)
    check(emu, g, 3, 8, torch.float32)


def test_hub_beyond_the_first_merge_level(emu):
    """Real constants: 9000 in-edges on one row needs the second record level (E > 256 * 32)."""
    ei, n, _ = hub_graph(n_hub_edges=9000, n_other=300)
    g = Graph.from_edge_index(ei, (n, n))
    check(emu, g, 1, 4, torch.float64)


def test_power_law_hubs_both_ways(deep):
    ei, n, _ = power_law_graph(300, 3000, alpha=1.5)
    ei = torch.cat([ei, ei.flip(0)], 1)
    g = Graph.from_edge_index(ei, (n, n))
    check(deep, g, 2, 8, torch.float32, p=0.1)
    check(deep, g, 4, 16, torch.float16)


# ---------------------------------------------------------------- layouts of memory

@pytest.mark.parametrize("kind", ["default", "deep"])
def test_misaligned_h_takes_scalar_path(kind):
    emu = emulated.load(kind)
    ei, n_src, n_dst = random_graph(30, 20, 150)
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    H, C = 2, 8
    flat = torch.randn(n_src * H * C + 1)
    h_odd = flat[1:].view(n_src, H, C)
    assert h_odd.data_ptr() % 16 != 0
    check(emu, g, H, C, torch.float32, ins=(h_odd,) + inputs(GAT, g, H, C, torch.float32)[1:])
