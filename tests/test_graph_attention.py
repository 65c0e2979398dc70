"""Sparse graph attention: the fused kernels against the float64 reference."""
import pytest
import torch

import neptune_ext
from neptune_ext import Graph, ops
from neptune_ext.reference import dropout_keep_mask, sparse_graph_attention_reference

from conftest import DEVICES
from graphs import cases, hub_graph

CASES = cases()


def make_inputs(n_src, n_dst, n_edges, H, C, dtype=torch.float64, device="cpu", scale=1.0,
                edge_logits=True, requires_grad=True):
    def r(*shape):
        return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype) \
            .requires_grad_(requires_grad)
    h = r(n_src, H, C)
    ss, sd = r(n_src, H), r(n_dst, H)
    el = r(n_edges, H) if edge_logits else None
    return h, ss, sd, el


def as_int64(g: Graph) -> Graph:
    """The same graph with int64 indices (the kernels' second index type)."""
    out = Graph(g.rowptr.long(), g.col.long(), g.eid.long(), g.edge_index, g.num_src, g.num_dst)
    out._csc = tuple(t.long() for t in g.csc())
    return out


def reference(h, ss, sd, g, slope=0.2, el=None, p=0.0, seed=None):
    return sparse_graph_attention_reference(h, ss, sd, g.edge_index[0], g.edge_index[1], g.num_dst,
                                            slope, el, p, None if seed is None else int(seed))


def grads(out, inputs, grad_out):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("with_edge_logits", [False, True])
@pytest.mark.parametrize("index", ["int32", "int64"])
def test_matches_reference_float64(name, with_edge_logits, index, device):
    ei, n_src, n_dst = CASES[name]
    g = Graph.from_edge_index(ei, (n_src, n_dst)).to(device)
    if index == "int64":
        g = as_int64(g)
    h, ss, sd, el = make_inputs(n_src, n_dst, ei.shape[1], 3, 7, device=device,
                                edge_logits=with_edge_logits)
    slope = float(torch.rand(()))
    out = ops.sparse_graph_attention(h, ss, sd, g, slope, el)
    exp = reference(h, ss, sd, g, slope, el)
    torch.testing.assert_close(out, exp, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(out)
    for a, b in zip(grads(out, (h, ss, sd, el), go), grads(exp, (h, ss, sd, el), go)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_large_logits_are_stable(device):
    ei, n_src, n_dst = CASES["random"]
    g = Graph.from_edge_index(ei, (n_src, n_dst)).to(device)
    h, ss, sd, el = make_inputs(n_src, n_dst, ei.shape[1], 2, 4, device=device, scale=300.0)
    out = ops.sparse_graph_attention(h, ss, sd, g, 0.2, el)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference(h, ss, sd, g, 0.2, el), rtol=1e-9, atol=1e-9)
    go = torch.randn_like(out)
    for a in grads(out, (h, ss, sd, el), go):
        assert torch.isfinite(a).all()


@pytest.mark.parametrize("device", DEVICES)
def test_hub_with_100k_in_edges(device):
    ei, n_src, n_dst = hub_graph()
    g = Graph.from_edge_index(ei, (n_src, n_dst)).to(device)
    h, ss, sd, el = make_inputs(n_src, n_dst, ei.shape[1], 2, 8, device=device)
    out = ops.sparse_graph_attention(h, ss, sd, g, 0.2, el)
    exp = reference(h, ss, sd, g, 0.2, el)
    torch.testing.assert_close(out, exp, rtol=1e-10, atol=1e-12)
    go = torch.randn_like(out)
    for a, b in zip(grads(out, (h, ss, sd, el), go), grads(exp, (h, ss, sd, el), go)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("device", DEVICES)
def test_isolated_destinations_get_zero(device):
    ei = torch.tensor([[0, 1], [2, 2]], device=device)
    g = Graph.from_edge_index(ei, (2, 4))
    h, ss, sd, _ = make_inputs(2, 4, 2, 1, 3, device=device, requires_grad=False)
    out = ops.sparse_graph_attention(h, ss, sd, g)
    assert torch.equal(out[[0, 1, 3]], torch.zeros_like(out[[0, 1, 3]]))
    assert out[2].abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_pytorch(dtype, device):
    """Error of the kernel (fp32 accumulation) vs float64 must not exceed twice the
    error of the same computation done by plain PyTorch in `dtype`."""
    ei, n_src, n_dst = CASES["random"]
    g = Graph.from_edge_index(ei, (n_src, n_dst)).to(device)
    h64, ss64, sd64, el64 = make_inputs(n_src, n_dst, ei.shape[1], 4, 16, device=device)
    low = [t.detach().to(dtype).requires_grad_() for t in (h64, ss64, sd64, el64)]
    ref64_in = [t.detach().to(dtype).double().requires_grad_() for t in (h64, ss64, sd64, el64)]
    out = ops.sparse_graph_attention(low[0], low[1], low[2], g, 0.2, low[3])
    ref_low = reference(*low[:3], g, 0.2, low[3])
    exact = reference(*ref64_in[:3], g, 0.2, ref64_in[3])
    eps = torch.finfo(dtype).eps
    err = (out.double() - exact).abs().max().item()
    err_torch = (ref_low.double() - exact).abs().max().item()
    assert err <= 2 * err_torch + 4 * eps, (err, err_torch)
    go = torch.randn_like(exact)
    g_k = grads(out, low, go.to(dtype))
    g_t = grads(ref_low, low, go.to(dtype))
    g_x = grads(exact, ref64_in, go)
    for a, b, x in zip(g_k, g_t, g_x):
        # Relative to the whole gradient (a norm), not entry by entry: an entry that is a sum
        # over many edges with cancellation carries rounding of the size of its terms, which
        # the fp32-accumulating kernel and PyTorch order differently; one such entry must
        # not decide the test by chance.
        scale = x.norm().item()
        e_k = (a.double() - x).norm().item() / scale
        e_t = (b.double() - x).norm().item() / scale
        assert e_k <= 2 * e_t + 16 * eps, (e_k, e_t)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_with_edge_logits_and_dropout(device):
    ei, n_src, n_dst = CASES["duplicates_and_self_loops"]
    g = Graph.from_edge_index(ei, (n_src, n_dst)).to(device)
    inputs = make_inputs(n_src, n_dst, ei.shape[1], 2, 3, device=device)
    seed = torch.tensor(987654321)

    def f(h, ss, sd, el):
        return ops.sparse_graph_attention(h, ss, sd, g, 0.1, el, dropout=0.25, training=True, seed=seed)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradcheck(lambda h, ss, sd: ops.sparse_graph_attention(h, ss, sd, g), inputs[:3])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_dropout", [False, True])
def test_opcheck(with_dropout, device):
    if neptune_ext._ext._C is None:
        pytest.skip("extension not built")
    ei, n_src, n_dst = CASES["random"]
    g = Graph.from_edge_index(ei, (n_src, n_dst)).to(device)
    h, ss, sd, el = make_inputs(n_src, n_dst, ei.shape[1], 2, 5, device=device)
    p, seed = (0.3, torch.tensor(11)) if with_dropout else (0.0, None)
    args = (h, ss, sd, g.rowptr, g.col, g.eid, *g.csc(), el, 0.2, p, seed)
    torch.library.opcheck(torch.ops.neptune.gat_forward.default, args)
    out, lse = torch.ops.neptune.gat_forward(*args)
    bargs = (torch.randn_like(out), h.detach(), ss.detach(), sd.detach(), g.rowptr, g.col, g.eid,
             *g.csc(), el.detach(), out.detach(), lse, 0.2, p, seed)
    torch.library.opcheck(torch.ops.neptune.gat_backward.default, bargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic(dtype, device):
    from graphs import power_law_graph
    ei, n, _ = power_law_graph(3000, 40_000)
    g = Graph.from_edge_index(ei, (n, n)).to(device)
    h, ss, sd, el = make_inputs(n, n, ei.shape[1], 4, 16, dtype=dtype, device=device)
    go = torch.randn(n, 4, 16, dtype=dtype, device=device)
    seed = torch.tensor(3)
    results = []
    threads = torch.get_num_threads()
    for n_threads in (threads, 1, threads):
        torch.set_num_threads(n_threads)
        try:
            out = ops.sparse_graph_attention(h, ss, sd, g, 0.2, el, 0.1, True, seed=seed)
            results.append([out] + list(grads(out, (h, ss, sd, el), go)))
        finally:
            torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_reproducible_and_matches_reference(device):
    ei, n_src, n_dst = CASES["random"]
    g = Graph.from_edge_index(ei, (n_src, n_dst)).to(device)
    h, ss, sd, el = make_inputs(n_src, n_dst, ei.shape[1], 3, 4, device=device)
    a = ops.sparse_graph_attention(h, ss, sd, g, 0.2, el, 0.4, True, seed=torch.tensor(5))
    b = ops.sparse_graph_attention(h, ss, sd, g, 0.2, el, 0.4, True, seed=torch.tensor(5))
    c = ops.sparse_graph_attention(h, ss, sd, g, 0.2, el, 0.4, True, seed=torch.tensor(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    exp = reference(h, ss, sd, g, 0.2, el, 0.4, 5)
    torch.testing.assert_close(a, exp, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(a)
    for x, y in zip(grads(a, (h, ss, sd, el), go), grads(exp, (h, ss, sd, el), go)):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    # Eval mode ignores dropout; the global generator drives the seed when none is given.
    assert torch.equal(ops.sparse_graph_attention(h, ss, sd, g, 0.2, el, 0.4, False),
                       ops.sparse_graph_attention(h, ss, sd, g, 0.2, el, 0.0, True))
    torch.manual_seed(1)
    d = ops.sparse_graph_attention(h, ss, sd, g, 0.2, el, 0.4, True)
    torch.manual_seed(1)
    assert torch.equal(d, ops.sparse_graph_attention(h, ss, sd, g, 0.2, el, 0.4, True))


def test_dropout_mask_statistics():
    keep = dropout_keep_mask(12345, torch.arange(200_000), 4, 0.3)
    frac = keep.float().mean().item()
    assert abs(frac - 0.7) < 0.005
    # Heads and neighbouring edges are decorrelated.
    assert abs((keep[:, 0] == keep[:, 1]).float().mean().item() - (0.7**2 + 0.3**2)) < 0.01
    assert abs((keep[1:, 0] == keep[:-1, 0]).float().mean().item() - (0.7**2 + 0.3**2)) < 0.01


@pytest.mark.parametrize("device", DEVICES)
def test_return_attention(device):
    ei, n_src, n_dst = CASES["isolated_destinations"]
    ei = ei.to(device)  # the reference and the checks below index with it
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    h, ss, sd, el = make_inputs(n_src, n_dst, ei.shape[1], 2, 3, device=device)
    out, alpha = ops.sparse_graph_attention(h, ss, sd, g, 0.2, el, return_attention=True)
    exp_out, exp_alpha = sparse_graph_attention_reference(
        h, ss, sd, ei[0], ei[1], n_dst, 0.2, el, return_attention=True)
    torch.testing.assert_close(out, exp_out)
    torch.testing.assert_close(alpha, exp_alpha)
    sums = torch.zeros(n_dst, 2, dtype=alpha.dtype, device=device).index_add(0, ei[1], alpha)
    has_edges = torch.bincount(ei[1], minlength=n_dst) > 0
    torch.testing.assert_close(sums[has_edges], torch.ones_like(sums[has_edges]))


def test_reference_fallback_matches(monkeypatch):
    ei, n_src, n_dst = CASES["random"]
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    h, ss, sd, el = make_inputs(n_src, n_dst, ei.shape[1], 2, 4)
    fused = ops.sparse_graph_attention(h, ss, sd, g, 0.2, el, 0.2, True, seed=torch.tensor(9))
    monkeypatch.setenv("NEPTUNE_FORCE_REFERENCE", "1")
    ref = ops.sparse_graph_attention(h, ss, sd, g, 0.2, el, 0.2, True, seed=torch.tensor(9))
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)


class TestBadInput:
    def setup_method(self):
        ei, n_src, n_dst = CASES["random"]
        self.g = Graph.from_edge_index(ei, (n_src, n_dst))
        self.h, self.ss, self.sd, self.el = make_inputs(n_src, n_dst, ei.shape[1], 2, 4,
                                                        requires_grad=False)

    def call(self, **kw):
        args = dict(h=self.h, score_src=self.ss, score_dst=self.sd, graph=self.g)
        args.update(kw)
        return ops.sparse_graph_attention(**args)

    @pytest.mark.parametrize("kw,match", [
        (lambda s: dict(h=s.h[:, :, 0]), r"h must have shape \[N_src, H, C\]"),
        (lambda s: dict(h=s.h[:-1], score_src=s.ss[:-1]), "h has .* source nodes but the graph has num_src"),
        (lambda s: dict(score_src=s.ss[:, :1]), r"score_src must have shape"),
        (lambda s: dict(score_dst=s.sd[:-1]), "score_dst has .* destination nodes"),
        (lambda s: dict(score_dst=s.sd[:, :1]), r"score_dst must have shape"),
        (lambda s: dict(h=s.h.long()), "h must be a floating-point tensor"),
        (lambda s: dict(edge_logits=s.el[:-1]), r"edge_logits must have shape \[E, H\]"),
        (lambda s: dict(dropout=1.0), r"dropout must be a float in \[0, 1\)"),
        (lambda s: dict(dropout=-0.1), r"dropout must be a float in \[0, 1\)"),
        (lambda s: dict(graph=s.g.edge_index), "graph must be a neptune_ext.Graph"),
        (lambda s: dict(h=[1, 2]), "h must be a torch.Tensor"),
    ])
    def test_raises(self, kw, match):
        with pytest.raises(ValueError, match=match):
            self.call(**kw(self))

    def test_mixed_dtypes_run_in_the_promoted_dtype(self):
        """As torch's binary ops (and PyG's layers under autocast): bfloat16 h with float32
        scores is computed, and returned, in float32 - the same numbers as with h cast."""
        h16 = self.h.to(torch.bfloat16)
        ss, sd, el = self.ss.float(), self.sd.float(), self.el.float()
        out = self.call(h=h16, score_src=ss, score_dst=sd, edge_logits=el)
        assert out.dtype == torch.float32
        want = self.call(h=h16.float(), score_src=ss, score_dst=sd, edge_logits=el)
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        out64 = self.call(score_src=self.ss.float())  # float64 h wins over float32 scores
        assert out64.dtype == torch.float64

    def test_raw_op_rejects_bad_shapes(self):
        if neptune_ext._ext._C is None:
            pytest.skip("extension not built")
        g = self.g
        with pytest.raises(RuntimeError, match="rowptr must be"):
            torch.ops.neptune.gat_forward(self.h, self.ss, self.sd, g.rowptr[:-1], g.col, g.eid,
                                          *g.csc(), None, 0.2, 0.0, None)
        with pytest.raises(RuntimeError, match="needs seed"):
            torch.ops.neptune.gat_forward(self.h, self.ss, self.sd, g.rowptr, g.col, g.eid,
                                          *g.csc(), None, 0.2, 0.5, None)


# ----------------------------------------------------------------- infinite logits
def _inf_case(kind):
    torch.manual_seed(1)
    ei = torch.tensor([[0, 1, 2, 3, 0, 1], [4, 4, 4, 4, 5, 5]])
    h = torch.randn(6, 2, 3, dtype=torch.float64)
    s = torch.randn(6, 2, dtype=torch.float64)
    el = torch.zeros(6, 2, dtype=torch.float64)
    if kind == "masked_first":
        el[0] = float("-inf")
    elif kind == "masked_last":
        el[3] = float("-inf")
    elif kind == "all_masked":
        el[4:] = float("-inf")
    elif kind == "plus_inf":
        el[1, 0] = float("inf")
    elif kind == "nan":
        el[2, 1] = float("nan")
    return ei, h, s, el


@pytest.mark.parametrize("kind", ["masked_first", "masked_last", "all_masked", "plus_inf", "nan"])
def test_infinite_logits_kernel_and_reference_agree(kind):
    ei, h, s, el = _inf_case(kind)
    g = Graph.from_edge_index(ei, 6)
    got = ops.sparse_graph_attention(h, s, s, g, edge_logits=el)
    want = sparse_graph_attention_reference(h, s, s, ei[0], ei[1], 6, 0.2, el)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)
    if kind in ("masked_first", "masked_last"):
        # A mask equals dropping the edge.
        keep = torch.isfinite(el[:, 0])
        g2 = Graph.from_edge_index(ei[:, keep], 6)
        torch.testing.assert_close(got, ops.sparse_graph_attention(h, s, s, g2,
                                   edge_logits=el[keep]), rtol=1e-12, atol=1e-12)
        hr = h.clone().requires_grad_()
        ops.sparse_graph_attention(hr, s, s, g, edge_logits=el).sum().backward()
        assert torch.isfinite(hr.grad).all()
    if kind == "all_masked":
        assert torch.equal(got[5], torch.zeros_like(got[5])) and torch.isfinite(got).all()
    if kind == "plus_inf":
        assert torch.isnan(got[4, 0]).all() and torch.isfinite(got[4, 1]).all()
        assert torch.isfinite(got[5]).all()
    if kind == "nan":
        assert torch.isnan(got[4, 1]).all() and torch.isfinite(got[4, 0]).all()


@pytest.mark.parametrize("slope", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_negative_slope_is_rejected(slope):
    with pytest.raises(ValueError, match="negative_slope"):
        neptune_ext.nn.GraphAttention(4, 4, negative_slope=slope)
    g = Graph.from_edge_index(torch.tensor([[0, 1], [1, 0]]), 2)
    h, s = torch.randn(2, 1, 3), torch.randn(2, 1)
    with pytest.raises(ValueError, match="negative_slope"):
        ops.sparse_graph_attention(h, s, s, g, negative_slope=slope)
