"""GraphAttentionV2 against torch_geometric.nn.GATv2Conv with the same weights."""
import itertools

import pytest
import torch

from neptune_ext import Graph
from neptune_ext.nn import GraphAttentionV2

pyg = pytest.importorskip("torch_geometric")
from torch_geometric.nn import GATv2Conv  # noqa: E402

COMBOS = list(itertools.product([False, True], [None, 3], [True, False], [True, False], [False, True],
                                ["mean", 0.5, "max"]))


def graph_with_loops(n, e):
    ei = torch.randint(0, n, (2, e))
    ei[:, :4] = torch.arange(4).repeat(2, 1)  # a few existing self loops
    return ei


def pair(kw, in_ch=12, out=5):
    ref = GATv2Conv(in_ch, out, **kw).double()
    ours = GraphAttentionV2(in_ch, out, **kw).double()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def compare(ref, ours, x, ei, ea=None, rtol=1e-10, atol=1e-12):
    xs = [(t.clone().requires_grad_() if isinstance(t, torch.Tensor) else tuple(u.clone().requires_grad_()
                                                                               for u in t)) for t in (x, x)]
    o1, (e1, a1) = ref(xs[0], ei, ea, return_attention_weights=True)
    o2, (e2, a2) = ours(xs[1], ei, ea, return_attention_weights=True)
    torch.testing.assert_close(o2, o1, rtol=rtol, atol=atol)
    assert torch.equal(e1, e2)
    torch.testing.assert_close(a2, a1, rtol=rtol, atol=atol)
    go = torch.randn_like(o1)
    leaves = lambda xx, m: (list(xx) if isinstance(xx, tuple) else [xx]) + list(m.parameters())  # noqa: E731
    g1 = torch.autograd.grad(o1, leaves(xs[0], ref), go, allow_unused=True)
    g2 = torch.autograd.grad(o2, leaves(xs[1], ours), go, allow_unused=True)
    for (name, _), a, b in zip([("x", None)] * (len(g1) - len(list(ref.parameters()))) +
                               list(ref.named_parameters()), g1, g2):
        if a is None:
            assert b is None or torch.count_nonzero(b) == 0, name
        else:
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("share, edge_dim, loops, concat, residual, fill", COMBOS)
def test_matches_gatv2conv(share, edge_dim, loops, concat, residual, fill):
    kw = dict(heads=3, concat=concat, share_weights=share, edge_dim=edge_dim, add_self_loops=loops,
              residual=residual, fill_value=fill)
    ref, ours = pair(kw)
    n, e = 40, 300
    ei = graph_with_loops(n, e)
    x = torch.randn(n, 12, dtype=torch.float64)
    ea = torch.randn(e, edge_dim, dtype=torch.float64) if edge_dim else None
    compare(ref, ours, x, ei, ea)


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("loops", [False, True])
def test_bipartite(share, loops):
    kw = dict(heads=2, share_weights=share, add_self_loops=loops)
    ref = GATv2Conv((7, 7) if share else (7, 5), 4, **kw).double()
    ours = GraphAttentionV2((7, 7) if share else (7, 5), 4, **kw).double()
    ours.load_state_dict(ref.state_dict())
    n_src, n_dst = 30, 30 if loops else 11  # PyG adds loops for min(n_src, n_dst) nodes
    ei = torch.stack([torch.randint(0, n_src, (120,)), torch.randint(0, n_dst, (120,))])
    x = (torch.randn(n_src, 7, dtype=torch.float64), torch.randn(n_dst, 7 if share else 5, dtype=torch.float64))
    compare(ref, ours, x, ei)


def test_dropout_training_and_eval():
    ours = GraphAttentionV2(8, 4, heads=2, dropout=0.5).double()
    ref = GATv2Conv(8, 4, heads=2, dropout=0.5).double()
    ref.load_state_dict(ours.state_dict())
    x, ei = torch.randn(20, 8, dtype=torch.float64), torch.randint(0, 20, (2, 90))
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x, ei), ref(x, ei))
    ours.train()
    a, b = ours(x, ei), ours(x, ei)
    assert not torch.equal(a, b)  # a fresh mask per call
    torch.manual_seed(3)
    c = ours(x, ei)
    torch.manual_seed(3)
    assert torch.equal(c, ours(x, ei))


def test_lazy_in_channels_and_state_dict_both_ways():
    ours = GraphAttentionV2(-1, 6, heads=2, edge_dim=2)
    x, ei = torch.randn(15, 9), torch.randint(0, 15, (2, 50))
    ea = torch.randn(50, 2)
    out = ours(x, ei, ea)
    assert out.shape == (15, 12)
    ref = GATv2Conv(9, 6, heads=2, edge_dim=2)
    ref.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ref(x, ei, ea), out, rtol=1e-5, atol=1e-6)
    ours2 = GraphAttentionV2(9, 6, heads=2, edge_dim=2)
    ours2.load_state_dict(ref.state_dict())
    assert set(ours2.state_dict()) == set(ref.state_dict())


def test_sparse_edge_index_and_graph_inputs():
    ref, ours = pair(dict(heads=2, add_self_loops=False))
    n = 25
    ei = torch.unique(torch.randint(0, n, (2, 90)), dim=1)  # coalesced order = sorted by (dst, src)
    ei = ei[:, torch.argsort(ei[1] * n + ei[0])]
    x = torch.randn(n, 12, dtype=torch.float64)
    exp = ref(x, ei)
    adj = torch.sparse_coo_tensor(torch.stack([ei[1], ei[0]]), torch.ones(ei.shape[1]), (n, n)).coalesce()
    torch.testing.assert_close(ours(x, adj), exp)
    torch.testing.assert_close(ours(x, adj.to_sparse_csr()), exp)
    torch.testing.assert_close(ours(x, Graph.from_edge_index(ei, (n, n))), exp)
    EdgeIndex = pytest.importorskip("torch_geometric").EdgeIndex
    torch.testing.assert_close(ours(x, EdgeIndex(ei, sparse_size=(n, n), sort_order="col")), exp)


def test_compile_matches_eager():
    ours = GraphAttentionV2(8, 4, heads=2, edge_dim=3).double()
    x, ei, ea = torch.randn(20, 8, dtype=torch.float64), torch.randint(0, 20, (2, 70)), torch.randn(70, 3)
    ea = ea.double()
    eager = ours(x, ei, ea)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=False)
    torch.testing.assert_close(compiled(x, ei, ea), eager)


@pytest.mark.parametrize("call, words", [
    (lambda m, x, ei: m((x, None), ei), "x_dst is None"),
    (lambda m, x, ei: m(x, ei, torch.randn(ei.shape[1], 2)), "edge_dim=None"),
    (lambda m, x, ei: m(x, ei + 100), "edge_index"),
    (lambda m, x, ei: m(x[:, :3], ei), "x has 3 features per row"),
])
def test_bad_calls_raise_clear_errors(call, words):
    m = GraphAttentionV2(8, 4, heads=2)
    x, ei = torch.randn(20, 8), torch.randint(0, 20, (2, 70))
    with pytest.raises(ValueError, match=words):
        call(m, x, ei)


@pytest.mark.parametrize("kw, words", [
    (dict(heads=0), "heads"), (dict(dropout=1.5), "dropout"), (dict(fill_value="median"), "fill_value"),
    (dict(negative_slope=float("inf")), "negative_slope"),
])
def test_bad_constructor_arguments(kw, words):
    with pytest.raises(ValueError, match=words):
        GraphAttentionV2(8, 4, **kw)
