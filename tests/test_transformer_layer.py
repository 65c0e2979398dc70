"""GraphTransformer against PyG's TransformerConv with the same weights: the argument space
in float64 (outputs, attention weights, every gradient), what TransformerConv's own tests
check, state dicts both ways, lazy sizing, autocast, sparse inputs' sizes, compile and the
errors. (The paths all attention layers share - every edge form x precision x mode, double
backward, pickling, PyG's tools - are in test_conformance_attention.py,
test_attention_user_paths.py and test_pyg_tools.py.)"""
import itertools

import pytest
import torch

from neptune_ext import Graph
from neptune_ext.nn import GraphTransformer

pyg = pytest.importorskip("torch_geometric")
from torch_geometric.nn import TransformerConv  # noqa: E402

ARGS = list(itertools.product([True, False], [False, True], [True, False], [None, 3], [False, True], [1, 3]))


def pair(in_ch, out, **kw):
    ref = TransformerConv(in_ch, out, **kw).double()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    ours = GraphTransformer(in_ch, out, **kw).double()
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def run(m, x, ei, ea, go):
    out, (ei_out, alpha) = m(x, ei, ea, return_attention_weights=True)
    leaves = [t for t in (x if isinstance(x, tuple) else (x,)) if t is not None]
    leaves += [ea] if ea is not None else []
    leaves += [p for _, p in sorted(m.named_parameters())]
    return out, ei_out, alpha, torch.autograd.grad(out, leaves, go, allow_unused=True)


@pytest.mark.parametrize("concat, beta, root_weight, edge_dim, bipartite, heads", ARGS)
def test_matches_transformer_conv_float64(concat, beta, root_weight, edge_dim, bipartite, heads):
    n_src, n_dst, E = 23, (15 if bipartite else 23), 90
    kw = dict(heads=heads, concat=concat, beta=beta, root_weight=root_weight, edge_dim=edge_dim,
              dropout=0.3)  # dropout: eval mode, so none
    ours, ref = pair((7, 5) if bipartite else 7, 4, **kw)
    ours.eval(), ref.eval()
    xs = torch.randn(n_src, 7, dtype=torch.float64, requires_grad=True)
    x = (xs, torch.randn(n_dst, 5, dtype=torch.float64, requires_grad=True)) if bipartite else xs
    ei = torch.stack([torch.randint(0, n_src, (E,)), torch.randint(0, n_dst, (E,))])
    ea = torch.randn(E, 3, dtype=torch.float64, requires_grad=True) if edge_dim else None
    o1, e1, a1, g1 = run(ref, x, ei, ea, go := torch.randn(n_dst, 4 * (heads if concat else 1),
                                                                 dtype=torch.float64))
    o2, e2, a2, g2 = run(ours, x, ei, ea, go)
    torch.testing.assert_close(o2, o1, rtol=1e-10, atol=1e-12)
    assert e2 is ei and e1 is ei
    torch.testing.assert_close(a2, a1, rtol=1e-10, atol=1e-12)
    # (The key bias's true gradient is 0: softmax ignores a per-row shift of the logits.
    # Both sides give rounding noise there, judged by the absolute tolerance.)
    for i, (a, b) in enumerate(zip(g1, g2)):
        assert (a is None) == (b is None), i
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11, msg=lambda m: f"gradient {i}: {m}")


def test_what_transformer_convs_own_test_checks():
    x1, x2 = torch.randn(4, 8), torch.randn(2, 16)
    ei = torch.tensor([[0, 1, 2, 3], [0, 0, 1, 1]])
    conv = GraphTransformer(8, 32, heads=2, beta=True)
    assert repr(conv) == "GraphTransformer(8, 32, heads=2)"
    out = conv(x1, ei)
    assert out.shape == (4, 64)
    adj_t = torch.sparse_coo_tensor(ei.flip(0), torch.ones(4), (4, 4)).coalesce()
    torch.testing.assert_close(conv(x1, adj_t), out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(conv(x1, adj_t.to_sparse_csr()), out, atol=1e-6, rtol=1e-6)
    for flag in (True, False):  # any bool asks for the weights, as in TransformerConv
        res = conv(x1, ei, return_attention_weights=flag)
        torch.testing.assert_close(res[0], out)
        assert res[1][0] is ei and res[1][1].shape == (4, 2)
        assert res[1][1].min() >= 0 and res[1][1].max() <= 1
        assert conv._alpha is None
    res = conv(x1, adj_t, return_attention_weights=True)
    assert res[1][0] is adj_t and res[1][1].shape == (4, 2)
    conv = GraphTransformer((8, 16), 32, heads=2, beta=True)
    out = conv((x1, x2), ei)
    assert out.shape == (2, 64)
    adj_t = torch.sparse_coo_tensor(ei.flip(0), torch.ones(4), (2, 4)).coalesce()
    torch.testing.assert_close(conv((x1, x2), adj_t), out, atol=1e-6, rtol=1e-6)


def test_state_dicts_load_both_ways_and_lazy_sizing():
    x, ei, ea = torch.randn(10, 6), torch.randint(0, 10, (2, 30)), torch.randn(30, 2)
    ours = GraphTransformer(-1, 4, heads=2, beta=True, edge_dim=2)
    out = ours(x, ei, ea)
    assert ours.lin_key.weight.shape == (8, 6) and ours.lin_skip.weight.shape == (8, 6)
    ref = TransformerConv(6, 4, heads=2, beta=True, edge_dim=2)
    assert sorted(ref.state_dict()) == sorted(ours.state_dict())
    ref.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ref(x, ei, ea), out, rtol=1e-5, atol=1e-6)
    back = GraphTransformer(6, 4, heads=2, beta=True, edge_dim=2)
    back.load_state_dict(ref.state_dict())
    torch.testing.assert_close(back(x, ei, ea), out, rtol=1e-5, atol=1e-6)
    # initialization on the same scale as TransformerConv's (torch's Linear rule)
    for name, p in GraphTransformer(256, 16, heads=8, beta=True, edge_dim=64).named_parameters():
        q = dict(TransformerConv(256, 16, heads=8, beta=True, edge_dim=64).named_parameters())[name]
        assert 0.7 < float(p.detach().std() / q.detach().std()) < 1.4, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_ch", [4, 64])
def test_autocast_forward_backward(dtype, in_ch):
    ours, ref = pair(in_ch, 8, heads=2, edge_dim=3, beta=True)
    ours, ref = ours.float(), ref.float()
    x = torch.randn(30, in_ch, requires_grad=True)
    ei, ea = torch.randint(0, 30, (2, 120)), torch.randn(120, 3)
    try:
        with torch.autocast("cpu", dtype):
            want = ref(x, ei, ea)
    except RuntimeError as e:  # a torch without this CPU autocast dtype
        pytest.skip(str(e)[:80])
    with torch.autocast("cpu", dtype):
        y = ours(x, ei, ea)
    assert y.dtype == want.dtype
    assert float((y.float() - want.float()).norm() / want.float().norm()) < 0.05
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all() and all(p.grad is not None for p in ours.parameters())


def test_sparse_inputs_define_the_sizes():
    m = GraphTransformer((5, 5), 3)
    idx = torch.stack([torch.randint(0, 4, (12,)), torch.randint(0, 9, (12,))])
    adj = torch.sparse_coo_tensor(idx, torch.ones(12), (4, 9)).coalesce()
    for a in (adj, adj.to_sparse_csr()):
        assert m((torch.randn(9, 5), torch.randn(4, 5)), a).shape == (4, 3)
        with pytest.raises(ValueError, match="x_dst .* 5 nodes .* num_dst = 4"):
            m((torch.randn(9, 5), torch.randn(5, 5)), a)
    ei = torch.stack([torch.randint(0, 9, (20,)), torch.randint(0, 4, (20,))])
    assert m((torch.randn(9, 5), torch.randn(4, 5)), pyg.EdgeIndex(ei, sparse_size=(9, 4))).shape == (4, 3)
    g = Graph.from_edge_index(ei, (9, 4))
    assert m((torch.randn(9, 5), torch.randn(4, 5)), g).shape == (4, 3)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_compile_fullgraph(mode):
    torch._dynamo.reset()
    m = GraphTransformer(5, 3, heads=2, edge_dim=2, beta=True).train(mode == "train")
    x, ei, ea = torch.randn(9, 5), torch.randint(0, 9, (2, 30)), torch.randn(30, 2)
    torch.manual_seed(3)
    got = torch.compile(m, fullgraph=True)(x, ei, ea)
    torch.manual_seed(3)
    want = m(x, ei, ea)
    if mode == "eval":
        torch.testing.assert_close(got, want)
    else:
        assert got.shape == want.shape and torch.isfinite(got).all()


def test_dropout_in_training_follows_torch_manual_seed():
    m = GraphTransformer(6, 4, heads=2, dropout=0.5).train()
    x, ei = torch.randn(20, 6), torch.randint(0, 20, (2, 80))
    torch.manual_seed(1)
    a = m(x, ei)
    torch.manual_seed(1)
    b = m(x, ei)
    torch.manual_seed(2)
    c = m(x, ei)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with torch.no_grad():
        assert torch.equal(m.eval()(x, ei), m(x, ei))


def test_clear_errors():
    x, ei = torch.randn(6, 4), torch.randint(0, 6, (2, 10))
    with pytest.raises(ValueError, match="edge_dim=None"):
        GraphTransformer(4, 2)(x, ei, torch.randn(10, 3))
    with pytest.raises(ValueError, match="aggr"):
        GraphTransformer(4, 2, aggr="mean")
    with pytest.raises(TypeError, match="add_self_loops"):
        GraphTransformer(4, 2, add_self_loops=False)
    with pytest.raises(ValueError, match="x_dst"):
        GraphTransformer(4, 2)((x, None), ei)
    with pytest.raises(ValueError, match="heads"):
        GraphTransformer(4, 2, heads=0)
    with pytest.raises(ValueError, match="in_channels"):
        GraphTransformer(0, 2)
    with pytest.raises(ValueError, match="x has 5 features"):
        GraphTransformer(4, 2)(torch.randn(6, 5), ei)


# ------------------------------------------------------------------ edge features inside the op

def _grad_errors(m, ref64, x, ei, ea, go, dtype):
    """Max error of grad x and grad lin_key.weight of m (in dtype) against ref64's float64,
    and the largest true gradient of each."""
    def grads(mod, dt):
        mod.zero_grad()
        xx = x.to(dt).detach().requires_grad_()
        out = mod(xx, ei, ea.to(dt))
        (out.double() * go).sum().backward()
        return xx.grad.double(), mod.lin_key.weight.grad.double()
    truth = grads(ref64, torch.float64)
    got = grads(m.to(dtype), dtype)
    return [(a - b).abs().max().item() for a, b in zip(got, truth)], [t.abs().max().item() for t in truth]


def test_saturated_softmax_gradients_as_accurate_as_transformer_conv():
    """Logits in the hundreds of thousands (one edge takes nearly all the weight), float32:
    the gradients through the softmax cancel to rounding, within a small factor of
    TransformerConv's own float32 error (the kernel sums D_i from the same products as the
    edges' dS, not from the output).

    Not claimed in float64, where the peer's error is 0 against itself: the backward takes
    a weight as exp(logit - lse) with one log-sum-exp per row and head, whose rounding
    (eps |lse|, about 6e-11 at 3e5) is an absolute error of every weight - in a row whose
    second weight is near 1e-6 that left gradients accurate to 1e-5..1e-3 relative (3 of
    300 seeds), not to eps. A known limit: it needs the row max saved beside the sum."""
    x = torch.randn(30, 8, dtype=torch.float64) * 1000
    ea = torch.randn(200, 4, dtype=torch.float64) * 1000
    ei = torch.randint(0, 30, (2, 200))
    ref = TransformerConv(8, 4, heads=3, edge_dim=4).double()
    go = torch.randn(30, 12, dtype=torch.float64)
    ours = GraphTransformer(8, 4, heads=3, edge_dim=4).double()
    ours.load_state_dict(ref.state_dict())
    peer = TransformerConv(8, 4, heads=3, edge_dim=4).double()
    peer.load_state_dict(ref.state_dict())
    e_ours, size = _grad_errors(ours, ref, x, ei, ea, go, torch.float32)
    e_peer, _ = _grad_errors(peer, ref, x, ei, ea, go, torch.float32)
    eps = torch.finfo(torch.float32).eps
    # (over 300 seeds the worst was 0.6 of 4x the peer's error; 8x leaves room for the tail)
    for a, b, m in zip(e_ours, e_peer, size):
        assert a <= 8 * b + 64 * eps * max(m, 1.0), (e_ours, e_peer, size)


def test_edge_attr_of_another_dtype_raises_as_transformer_conv(monkeypatch):
    conv = GraphTransformer(6, 4, heads=3, edge_dim=3)
    x, ei = torch.randn(10, 6), torch.randint(0, 10, (2, 25))
    for force in ("0", "1"):
        monkeypatch.setenv("NEPTUNE_FORCE_REFERENCE", force)
        with pytest.raises(RuntimeError, match="same dtype"):
            conv(x, ei, torch.randn(25, 3, dtype=torch.float64))


@pytest.mark.parametrize("module", ["lin_key", "lin_value", "lin_edge"])
def test_forward_hooks_on_the_projections_run(module):
    """The projections' weights are used directly only while nothing hooks the modules."""
    x, ei, ea = torch.randn(12, 6), torch.randint(0, 12, (2, 40)), torch.randn(40, 3)
    ref = TransformerConv(6, 4, heads=3, edge_dim=3)
    ours = GraphTransformer(6, 4, heads=3, edge_dim=3)
    ours.load_state_dict(ref.state_dict())
    for m in (ref, ours):
        getattr(m, module).register_forward_hook(lambda mod, inp, out: out * 2)
    torch.testing.assert_close(ours(x, ei, ea), ref(x, ei, ea), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(concat=False), dict(concat=False, beta=True), dict(root_weight=False)])
def test_stacked_projections_match_transformer_conv(kw):
    """One input of at least projection.STACK_MIN_IN features: query, key, value (and the skip,
    whose width is C when heads are averaged) come from one GEMM; outputs and gradients are
    TransformerConv's in float64."""
    from neptune_ext.attention.projection import STACK_MIN_IN
    fin = STACK_MIN_IN
    ref = TransformerConv(fin, 8, heads=3, **kw).double()
    ours = GraphTransformer(fin, 8, heads=3, **kw).double()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(300, fin, dtype=torch.float64, requires_grad=True)
    ei = torch.randint(0, 300, (2, 1500))
    with torch.autograd.profiler.profile() as prof:
        out = ours(x, ei)
    gemms = sum(ev.name in ("aten::addmm", "aten::mm", "neptune::linear") for ev in prof.function_events)
    assert gemms == 1 + bool(kw.get("beta")), gemms  # (lin_beta's own, on the output)
    want = ref(x, ei)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    go = torch.randn_like(want)
    names = [n for n, _ in ref.named_parameters()]
    mine = dict(ours.named_parameters())
    got = torch.autograd.grad(out, [x] + [mine[n] for n in names], go, allow_unused=True)
    exp = torch.autograd.grad(want, [x] + [p for _, p in ref.named_parameters()], go, allow_unused=True)
    for n, a, b in zip(["x"] + names, got, exp):
        if b is None:
            assert a is None or not a.any(), n
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=n)


def test_skip_sum_lands_in_place_only_in_the_ops_own_tensor(monkeypatch):
    """Without beta the skip x_r = lin_skip(x) is added in place when it is neptune::linear's
    new tensor (a large graph: no [N, H C] buffer whose pages fault in); never into a tensor
    a hook was handed, nor into a slice of stacked projections."""
    from neptune_ext.attention import projection
    monkeypatch.setattr(projection, "USE_ONEDNN", False)
    n = projection.CACHE_MIN_BYTES // (4 * 64) + 10
    layer = GraphTransformer(32, 16, heads=4)
    x = torch.randn(n, 32)
    ei = torch.randint(0, n, (2, 3 * n))
    with torch.autograd.profiler.profile() as prof:
        out = layer(x, ei)
    names = [e.name for e in prof.function_events]
    assert "aten::add_" in names and "aten::add" not in names
    seen = []
    h = layer.lin_skip.register_forward_hook(lambda m, i, o: seen.append((o, o.clone())))
    try:
        out_hooked = layer(x, ei)
    finally:
        h.remove()
    assert torch.equal(seen[0][0], seen[0][1])  # the hook's tensor was not written
    assert torch.allclose(out_hooked, out, rtol=1e-6, atol=1e-6)
