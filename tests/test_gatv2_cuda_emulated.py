"""The CUDA GATv2 kernels, run on the CPU by tests/cuda_emulation: what GATv2 alone has -
rows of the graph beyond x_r (GATConv's phantom row) are ignored, with dropout masks that
stay the caller's edge ids. What every variant's kernels have (cases, layouts, dropout,
index types, the H * C limit) is in test_attention_cuda_emulated.py."""
import pytest
import torch

from neptune_ext import Graph

import emulated_attention as emulated
from attention_variants import GATV2
from graphs import random_graph

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def emu():
    return emulated.load("default")


def check(ops, g, H, C, dtype, **kw):
    return emulated.check(ops, GATV2, g, H, C, dtype, **kw)


def test_ignored_rows_and_dropout(emu):
    ei, n_src, n_dst = random_graph(30, 24, 200)
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    check(emu, g, 3, 8, torch.float64, n_dst=n_dst - 5)
    check(emu, g, 3, 8, torch.float64, n_dst=n_dst - 5, p=0.4)
    check(emu, g, 2, 6, torch.float32, n_dst=n_dst - 1, p=0.2)
