"""Adversarial graphs shared by the graph-attention tests: (edge_index, num_src, num_dst)."""
import torch


def random_graph(n_src, n_dst, n_edges, device="cpu"):
    src = torch.randint(0, n_src, (n_edges,), device=device)
    dst = torch.randint(0, n_dst, (n_edges,), device=device)
    return torch.stack([src, dst]), n_src, n_dst


def power_law_graph(n, n_edges, alpha=1.2, device="cpu"):
    """Destinations drawn from a Zipf-like law (a few hubs), sources uniform."""
    w = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** alpha
    dst = torch.multinomial(w, n_edges, replacement=True)
    dst = torch.randperm(n)[dst]
    src = torch.randint(0, n, (n_edges,))
    return torch.stack([src, dst]).to(device), n, n


def cases(device="cpu"):
    """name -> (edge_index, num_src, num_dst)."""
    out = {}
    out["random"] = random_graph(37, 29, 211, device)
    out["empty"] = (torch.empty(2, 0, dtype=torch.int64, device=device), 5, 7)
    # Half of the destinations receive no edge at all.
    ei, _, _ = random_graph(20, 15, 80, device)
    ei[1] = ei[1] % 15 * 2 % 30
    out["isolated_destinations"] = (ei, 20, 30)
    # Duplicate edges and self loops.
    base, _, _ = random_graph(12, 12, 40, device)
    loops = torch.arange(12, device=device).repeat(2, 1)
    out["duplicates_and_self_loops"] = (torch.cat([base, base[:, :15], loops], 1), 12, 12)
    out["bipartite_wide"] = random_graph(200, 3, 150, device)
    out["bipartite_narrow"] = random_graph(2, 90, 150, device)
    out["single_edge"] = (torch.tensor([[0], [0]], device=device), 1, 1)
    return out


def hub_graph(n_hub_edges=100_000, n_other=50, device="cpu"):
    """One destination (0) with n_hub_edges in-edges, plus a sprinkle of small rows."""
    n = 1000
    hub = torch.stack([torch.randint(0, n, (n_hub_edges,)), torch.zeros(n_hub_edges, dtype=torch.int64)])
    rest, _, _ = random_graph(n, n, n_other)
    return torch.cat([hub, rest], 1).to(device), n, n
