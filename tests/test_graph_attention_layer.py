"""GraphAttention vs torch_geometric.nn.GATConv with copied weights, in float64."""

import pytest
import torch

from neptune_ext import Graph
from neptune_ext.nn import GraphAttention

pyg_nn = pytest.importorskip("torch_geometric.nn")

CONFIGS = [
    dict(heads=1),
    dict(heads=3),
    dict(heads=3, concat=False),
    dict(heads=2, add_self_loops=False),
    dict(heads=2, negative_slope=0.05),
    dict(heads=2, residual=True),
    dict(heads=2, residual=True, concat=False, bias=False),
    dict(heads=2, edge_dim=4),
    dict(heads=2, edge_dim=4, fill_value="add"),
    dict(heads=2, edge_dim=4, fill_value="max"),
    dict(heads=2, edge_dim=4, fill_value=0.5),
    dict(heads=2, edge_dim=1, add_self_loops=False),
]


def make_pair(in_channels, out_channels, **kw):
    ours = GraphAttention(in_channels, out_channels, **kw).double()
    theirs = pyg_nn.GATConv(in_channels, out_channels, **kw).double()
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=True)
    assert not missing and not unexpected
    return ours, theirs


def random_edges(n_src, n_dst, E, with_loops=True):
    ei = torch.stack([torch.randint(0, n_src, (E,)), torch.randint(0, n_dst, (E,))])
    if with_loops:  # make sure some input self loops exist (GATConv removes them)
        k = min(5, n_src, n_dst)
        ei = torch.cat([ei, torch.arange(k).repeat(2, 1), ei[:, :7]], dim=1)
    return ei


def compare(ours, theirs, x, ei, edge_attr=None, size=None):
    params_o = dict(ours.named_parameters())
    params_t = dict(theirs.named_parameters())
    assert params_o.keys() == params_t.keys()
    xs = x if isinstance(x, tuple) else (x,)
    xs_o = [t.clone().requires_grad_() if t is not None else None for t in xs]
    xs_t = [t.clone().requires_grad_() if t is not None else None for t in xs]
    ea_o = edge_attr.clone().requires_grad_() if edge_attr is not None else None
    ea_t = edge_attr.clone().requires_grad_() if edge_attr is not None else None
    arg_o = tuple(xs_o) if isinstance(x, tuple) else xs_o[0]
    arg_t = tuple(xs_t) if isinstance(x, tuple) else xs_t[0]
    out_o, (ei_o, a_o) = ours(arg_o, ei, ea_o, size=size, return_attention_weights=True)
    out_t, (ei_t, a_t) = theirs(arg_t, ei, ea_t, size=size, return_attention_weights=True)
    torch.testing.assert_close(out_o, out_t, rtol=1e-10, atol=1e-12)
    assert torch.equal(ei_o, ei_t)
    torch.testing.assert_close(a_o, a_t, rtol=1e-10, atol=1e-12)
    go = torch.randn_like(out_o)
    loss_o = (out_o * go).sum() + (a_o * torch.arange(a_o.numel(), dtype=a_o.dtype).view_as(a_o)).sum() * 1e-3
    loss_t = (out_t * go).sum() + (a_t * torch.arange(a_t.numel(), dtype=a_t.dtype).view_as(a_t)).sum() * 1e-3
    wrt_o = [t for t in xs_o + [ea_o] if t is not None] + list(params_o.values())
    wrt_t = [t for t in xs_t + [ea_t] if t is not None] + [params_t[k] for k in params_o]
    g_o = torch.autograd.grad(loss_o, wrt_o, allow_unused=True)
    g_t = torch.autograd.grad(loss_t, wrt_t, allow_unused=True)
    names = [f"input{i}" for i in range(len(wrt_o) - len(params_o))] + list(params_o)
    for name, a, b in zip(names, g_o, g_t):
        if b is None:  # unused in GATConv: unused here too (None, not zeros)
            assert a is None, name
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_matches_gatconv(kw):
    n, F_in, C = 23, 6, 5
    ours, theirs = make_pair(F_in, C, **kw)
    x = torch.randn(n, F_in, dtype=torch.float64)
    ei = random_edges(n, n, 80)
    ea = torch.randn(ei.shape[1], kw["edge_dim"], dtype=torch.float64) if kw.get("edge_dim") else None
    if ea is not None and kw["edge_dim"] == 1 and kw.get("add_self_loops") is False:
        ea = ea.view(-1)
    compare(ours, theirs, x, ei, ea)


@pytest.mark.parametrize("kw", [dict(heads=2), dict(heads=2, residual=True, edge_dim=3),
                                dict(heads=1, concat=False, add_self_loops=False)])
@pytest.mark.parametrize("n_src,n_dst", [(17, 9), (6, 20)])
def test_matches_gatconv_bipartite(kw, n_src, n_dst):
    if kw.get("edge_dim") and n_src < n_dst:
        pytest.skip("GATConv itself fails here: its 'mean' loop fill scatters over all destinations "
                    "into min(n_src, n_dst) slots")
    ours, theirs = make_pair((7, 4), 3, **kw)
    x = (torch.randn(n_src, 7, dtype=torch.float64), torch.randn(n_dst, 4, dtype=torch.float64))
    ei = random_edges(n_src, n_dst, 60)
    ea = torch.randn(ei.shape[1], 3, dtype=torch.float64) if kw.get("edge_dim") else None
    compare(ours, theirs, x, ei, ea)


def test_matches_gatconv_shared_lin_pair_input():
    ours, theirs = make_pair(5, 4, heads=2)
    x = (torch.randn(12, 5, dtype=torch.float64), torch.randn(12, 5, dtype=torch.float64))
    compare(ours, theirs, x, random_edges(12, 12, 40))


def test_sparse_adjacency_input():
    ours, theirs = make_pair(5, 4, heads=2)
    n = 15
    ei = random_edges(n, n, 50, with_loops=False)
    ei = torch.unique(ei, dim=1)
    adj = torch.sparse_coo_tensor(torch.stack([ei[1], ei[0]]), torch.ones(ei.shape[1]), (n, n)).coalesce()
    x = torch.randn(n, 5, dtype=torch.float64)
    out_adj = ours(x, adj)
    out_csr = ours(x, adj.to_sparse_csr())
    idx = adj.indices()
    out_ei = ours(x, torch.stack([idx[1], idx[0]]))
    torch.testing.assert_close(out_adj, out_ei)
    torch.testing.assert_close(out_csr, out_ei)
    torch.testing.assert_close(out_ei, theirs(x, torch.stack([idx[1], idx[0]])))


def test_state_dict_round_trip_and_graph_input():
    theirs = pyg_nn.GATConv(8, 4, heads=2, edge_dim=2, residual=True).double()
    ours = GraphAttention(8, 4, heads=2, edge_dim=2, residual=True).double()
    ours.load_state_dict(theirs.state_dict())
    theirs2 = pyg_nn.GATConv(8, 4, heads=2, edge_dim=2, residual=True).double()
    theirs2.load_state_dict(ours.state_dict())
    x, ei = torch.randn(10, 8, dtype=torch.float64), random_edges(10, 10, 30, with_loops=False)
    ea = torch.randn(ei.shape[1], 2, dtype=torch.float64)
    torch.testing.assert_close(theirs(x, ei, ea), theirs2(x, ei, ea))
    # A prebuilt Graph is used as is (no self loops added).
    ours.add_self_loops = theirs.add_self_loops = False
    g = Graph.from_edge_index(ei, 10)
    torch.testing.assert_close(ours(x, g, ea), theirs(x, ei, ea))


def test_graph_is_cached_for_same_edge_index():
    conv = GraphAttention(4, 3, heads=2)
    x, ei = torch.randn(9, 4), random_edges(9, 9, 30)
    conv(x, ei)
    cached = conv._graph_cache[2]
    conv(x, ei)
    assert conv._graph_cache[2] is cached
    ei2 = ei.clone()
    ei2[0, 0] = (ei2[0, 0] + 1) % 9
    conv(x, ei2)
    assert conv._graph_cache[2] is not cached
    ei.add_(0)  # in-place change bumps the version: rebuilt
    conv(x, ei)
    assert conv._graph_cache[2] is not cached


def test_dropout_trains_and_eval_is_deterministic():
    conv = GraphAttention(6, 4, heads=2, dropout=0.5)
    x, ei = torch.randn(20, 6), random_edges(20, 20, 60)
    conv.train()
    a, b = conv(x, ei), conv(x, ei)
    assert not torch.equal(a, b)
    conv.eval()
    assert torch.equal(conv(x, ei), conv(x, ei))


@pytest.mark.parametrize("bad,match", [
    (lambda x, ei: (x[:, :2], ei), "x has 2 features per row but the layer was built for 6"),
    (lambda x, ei: (x, ei.float()), "edge_index must be an integer tensor"),
    (lambda x, ei: (x, ei[:1]), r"shape \[2, E\]"),
    (lambda x, ei: (x, ei + 100), "outside"),
    (lambda x, ei: (x, [[0, 1], [1, 0]]), "edge_index must be"),
    (lambda x, ei: (x[0], ei), r"x must be a \[N, F\] tensor"),
])
def test_bad_input(bad, match):
    conv = GraphAttention(6, 4, heads=2)
    x, ei = torch.randn(10, 6), random_edges(10, 10, 20)
    with pytest.raises((ValueError, RuntimeError), match=match):
        conv(*bad(x, ei))


def test_constructor_validation():
    with pytest.raises(ValueError, match="heads"):
        GraphAttention(4, 4, heads=0)
    with pytest.raises(ValueError, match="dropout"):
        GraphAttention(4, 4, dropout=1.5)
    with pytest.raises(ValueError, match="fill_value"):
        GraphAttention(4, 4, fill_value="median")


# -------------------------------------------------------------------------- caches
def test_fresh_int32_edge_index_at_a_reused_address_is_never_served_stale():
    torch.manual_seed(0)
    conv = GraphAttention(6, 4, heads=2)
    fresh = GraphAttention(6, 4, heads=2)
    fresh.load_state_dict(conv.state_dict())
    fresh.cache_graph = False
    x = torch.randn(50, 6)
    for step in range(60):
        ei = torch.randint(0, 50, (2, 300), dtype=torch.int32)  # freed each step: addresses recur
        torch.testing.assert_close(conv(x, ei), fresh(x, ei), rtol=0, atol=0, msg=f"step {step}")
        del ei


def test_views_with_the_same_address_and_other_strides_do_not_collide():
    conv = GraphAttention(6, 4, heads=2)
    x = torch.randn(50, 6)
    base = torch.randint(0, 50, (2, 80))
    a, b = base[:, :40], base[:, ::2]
    assert a.data_ptr() == b.data_ptr()
    out_a, out_b = conv(x, a), conv(x, b)
    conv.clear_graph_cache()
    torch.testing.assert_close(out_b, conv(x, b.clone()), rtol=0, atol=0)
    torch.testing.assert_close(out_a, conv(x, a.clone()), rtol=0, atol=0)


def test_in_place_edit_of_edge_index_rebuilds_the_graph():
    conv = GraphAttention(6, 4, heads=2)
    x, ei = torch.randn(20, 6), torch.randint(0, 20, (2, 60))
    conv(x, ei)
    ei[0, :30] = (ei[0, :30] + 3) % 20
    want = GraphAttention(6, 4, heads=2)
    want.load_state_dict(conv.state_dict())
    torch.testing.assert_close(conv(x, ei), want(x, ei.clone()), rtol=0, atol=0)




def test_bipartite_without_destination_features_matches_gatconv():
    torch.manual_seed(0)
    ours = GraphAttention((8, 16), 4, heads=2).double()
    theirs = pyg_nn.GATConv((8, 16), 4, heads=2).double()
    theirs.load_state_dict(ours.state_dict())
    x_src = torch.randn(4, 8, dtype=torch.float64)
    ei = torch.tensor([[0, 1, 2, 3, 1], [0, 0, 1, 1, 1]])
    out_o = ours((x_src, None), ei, size=(4, 2))
    out_t = theirs((x_src, None), ei, size=(4, 2))
    torch.testing.assert_close(out_o, out_t, rtol=1e-10, atol=1e-12)
    out_o.sum().backward(), out_t.sum().backward()
    for name, p in theirs.named_parameters():
        mine = dict(ours.named_parameters())[name].grad
        if p.grad is None:
            assert mine is None, name
        else:
            torch.testing.assert_close(mine, p.grad, rtol=1e-9, atol=1e-11)
    assert ours.att_dst.grad is None and ours.lin_dst.weight.grad is None


@pytest.mark.parametrize("in_channels", [-1, (-1, -1)])
def test_lazy_in_channels_like_gatconv(in_channels):
    torch.manual_seed(0)
    ours = GraphAttention(in_channels, 4, heads=2, residual=True).double()
    theirs = pyg_nn.GATConv(in_channels, 4, heads=2, residual=True).double()
    x = torch.randn(10, 7, dtype=torch.float64)
    ei = torch.randint(0, 10, (2, 30))
    ours(x, ei), theirs(x, ei)  # both sized by the first call
    assert set(ours.state_dict()) == set(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x, ei), theirs(x, ei), rtol=1e-10, atol=1e-12)
    assert ours.state_dict()["lin.weight" if in_channels == -1 else "lin_src.weight"].shape == (8, 7)


def test_three_dimensional_x_dst_is_reported_as_x():
    conv = GraphAttention((4, 4), 4)
    with pytest.raises(ValueError, match=r"x_dst"):
        conv((torch.randn(5, 4), torch.randn(5, 4, 1)), torch.tensor([[0, 1], [1, 0]]))


@pytest.mark.parametrize("scores_from", ["x", "h", "auto"])
def test_attention_scores_from_x_or_h_match_gatconv(scores_from):
    # in_channels 40 > heads * out 8: "auto" takes the h path here.
    torch.manual_seed(0)
    ours, theirs = make_pair(40, 4, heads=2)
    ours.scores_from = scores_from
    x, ei = torch.randn(12, 40, dtype=torch.float64), random_edges(12, 12, 40)
    compare(ours, theirs, x, ei)
