"""`make demo`: a short tour (replaced by the Neptune training job once it lands)."""
import time

import torch

import neptune_ext
from neptune_ext import Graph, ops


def main():
    neptune_ext.info()
    torch.manual_seed(0)
    n, E, H, C = 20_000, 200_000, 4, 32
    ei = torch.randint(0, n, (2, E))
    g = Graph.from_edge_index(ei, n)
    h = torch.randn(n, H, C, requires_grad=True)
    ss, sd = torch.randn(n, H, requires_grad=True), torch.randn(n, H, requires_grad=True)
    t = time.perf_counter()
    out = ops.sparse_graph_attention(h, ss, sd, g)
    out.square().sum().backward()
    print(f"\nsparse_graph_attention fwd+bwd on {g}: {1e3 * (time.perf_counter() - t):.1f} ms")


if __name__ == "__main__":
    main()
