"""GraphAttention under torch.compile, torch.export and DistributedDataParallel, and a
small training run that must learn."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from neptune_ext.nn import GraphAttention


def _inputs(n=40, f=8, E=150, edge_dim=None):
    x = torch.randn(n, f)
    ei = torch.randint(0, n, (2, E))
    ea = torch.randn(E, edge_dim) if edge_dim else None
    return x, ei, ea


@pytest.mark.parametrize("kw", [dict(heads=2), dict(heads=2, edge_dim=3, residual=True),
                                dict(heads=3, concat=False, add_self_loops=False)])
def test_compile_fullgraph_matches_eager(kw):
    torch._dynamo.reset()
    conv = GraphAttention(8, 4, **kw)
    x, ei, ea = _inputs(edge_dim=kw.get("edge_dim"))
    x.requires_grad_()
    compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
    out_c = compiled(x, ei, ea)
    out_e = conv(x, ei, ea)
    torch.testing.assert_close(out_c, out_e)
    g_c = torch.autograd.grad(out_c.square().sum(), [x] + list(conv.parameters()))
    g_e = torch.autograd.grad(out_e.square().sum(), [x] + list(conv.parameters()))
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)


def test_compile_inductor_no_graph_breaks():
    torch._dynamo.reset()
    conv = GraphAttention(8, 4, heads=2)
    x, ei, _ = _inputs()
    explanation = torch._dynamo.explain(conv)(x, ei)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(conv, fullgraph=True)
    torch.testing.assert_close(compiled(x, ei), conv(x, ei))


def test_export():
    conv = GraphAttention(8, 4, heads=2, edge_dim=2).eval()
    x, ei, ea = _inputs(edge_dim=2)
    ep = torch.export.export(conv, (x, ei, ea))
    torch.testing.assert_close(ep.module()(x, ei, ea), conv(x, ei, ea))
    x2, ei2, ea2 = _inputs(edge_dim=2)
    torch.testing.assert_close(ep.module()(x2, ei2, ea2), conv(x2, ei2, ea2))


def _ddp_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = GraphAttention(8, 4, heads=2)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(30, 8, generator=g)
    ei = torch.randint(0, 30, (2, 90), generator=g)
    for _ in range(3):
        opt.zero_grad()
        ddp(x, ei).square().mean().backward()
        opt.step()
    torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_gloo_two_processes(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    s0 = torch.load(tmp_path / "rank0.pt")
    s1 = torch.load(tmp_path / "rank1.pt")
    # Reference: one process, gradient = mean of the two ranks' gradients.
    torch.manual_seed(0)
    model = GraphAttention(8, 4, heads=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = []
    for rank in range(2):
        g = torch.Generator().manual_seed(100 + rank)
        data.append((torch.randn(30, 8, generator=g), torch.randint(0, 30, (2, 90), generator=g)))
    for _ in range(3):
        opt.zero_grad()
        loss = sum(model(x, ei).square().mean() for x, ei in data) / 2
        loss.backward()
        opt.step()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(s0[k], s1[k], rtol=0, atol=0)
        torch.testing.assert_close(s0[k], v, rtol=1e-5, atol=1e-6)


def _sbm(n_per_class=60, classes=4, p_in=0.08, p_out=0.005, noise=2.0):
    """Stochastic block model: features are a weak class signal, edges mostly within class."""
    y = torch.arange(classes).repeat_interleave(n_per_class)
    n = y.numel()
    same = y[:, None] == y[None, :]
    prob = torch.where(same, torch.tensor(p_in), torch.tensor(p_out))
    adj = torch.rand(n, n) < prob
    ei = adj.nonzero().t()
    centers = torch.randn(classes, 16)
    x = centers[y] + noise * torch.randn(n, 16)
    return x, ei, y


def test_training_learns_node_classification():
    x, ei, y = _sbm()
    n = y.numel()
    perm = torch.randperm(n)
    train, test = perm[: n // 2], perm[n // 2:]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = GraphAttention(16, 8, heads=4, dropout=0.1)
            self.c2 = GraphAttention(32, 4, heads=1)

        def forward(self, x, ei):
            return self.c2(F.elu(self.c1(x, ei)), ei)

    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=5e-4)
    losses = []
    for _ in range(80):
        net.train()
        opt.zero_grad()
        loss = F.cross_entropy(net(x, ei)[train], y[train])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    net.eval()
    with torch.no_grad():
        acc = (net(x, ei)[test].argmax(1) == y[test]).float().mean().item()
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    # Chance is 0.25; the graph makes the classes separable well beyond the noisy features.
    assert acc >= 0.25 + 0.5, acc
