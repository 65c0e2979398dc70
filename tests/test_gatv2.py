"""The GATv2 op: fused kernels against the float64 reference."""
import subprocess
import sys

import pytest
import torch

import neptune_ext
from neptune_ext import Graph, ops
from neptune_ext.reference import gatv2_attention_reference

from conftest import _SEED, DEVICES
from graph_attention_checks import rel_err
from graphs import cases, hub_graph, power_law_graph

with torch.random.fork_rng():  # the graphs follow the run's seed too (replayable)
    torch.manual_seed(_SEED)
    CASES = cases()


def make_inputs(n_src, n_dst, n_edges, H, C, dtype=torch.float64, device="cpu", scale=1.0,
                edge_feat=True, requires_grad=True):
    def r(*shape):
        return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype) \
            .requires_grad_(requires_grad)
    return r(n_src, H, C), r(n_dst, H, C), r(H, C), (r(n_edges, H, C) if edge_feat else None)


def reference(xl, xr, att, g, slope=0.2, ef=None, p=0.0, seed=None):
    return gatv2_attention_reference(xl, xr, att, g.edge_index[0], g.edge_index[1], g.num_dst,
                                     slope, ef, p, None if seed is None else int(seed))


def grads(out, inputs, grad_out):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


def compiled_kernel():
    return neptune_ext._ext._C is not None and hasattr(torch.ops.neptune, "gatv2_forward")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("with_edge_feat", [False, True])
def test_matches_reference_float64(name, with_edge_feat, device):
    ei, n_src, n_dst = CASES[name]
    g = Graph.from_edge_index(ei, (n_src, n_dst)).to(device)
    xl, xr, att, ef = make_inputs(n_src, n_dst, ei.shape[1], 3, 5, device=device, edge_feat=with_edge_feat)
    slope = float(torch.rand(()))
    out = ops.gatv2_attention(xl, xr, att, g, slope, ef)
    exp = reference(xl, xr, att, g, slope, ef)
    torch.testing.assert_close(out, exp, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(out)
    for a, b in zip(grads(out, (xl, xr, att, ef), go), grads(exp, (xl, xr, att, ef), go)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("device", DEVICES)
def test_extra_graph_rows_are_ignored(device):
    """Rows of the graph beyond x_r (GATConv's phantom row) give no output and no gradient."""
    ei, n_src, n_dst = CASES["random"]
    g = Graph.from_edge_index(ei, (n_src, n_dst)).to(device)
    keep = n_dst - 4
    xl, xr, att, ef = make_inputs(n_src, keep, ei.shape[1], 2, 3, device=device)
    out = ops.gatv2_attention(xl, xr, att, g, 0.2, ef)
    assert out.shape == (keep, 2, 3)
    mask = ei[1].to(device) < keep
    sub = Graph.from_edge_index(ei[:, mask.cpu()], (n_src, keep)).to(device)
    ef_sub = ef.detach()[mask].requires_grad_()
    exp = reference(xl, xr, att, sub, 0.2, ef_sub)
    torch.testing.assert_close(out, exp, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(out)
    g_out = grads(out, (xl, xr, att, ef), go)
    g_exp = grads(exp, (xl, xr, att, ef_sub), go)
    for a, b in zip(g_out[:3], g_exp[:3]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(g_out[3][mask], g_exp[3], rtol=1e-10, atol=1e-11)
    assert torch.equal(g_out[3][~mask], torch.zeros_like(g_out[3][~mask]))


@pytest.mark.parametrize("device", DEVICES)
def test_hub_with_100k_in_edges(device):
    ei, n_src, n_dst = hub_graph()
    g = Graph.from_edge_index(ei, (n_src, n_dst)).to(device)
    xl, xr, att, ef = make_inputs(n_src, n_dst, ei.shape[1], 2, 4, device=device)
    out = ops.gatv2_attention(xl, xr, att, g, 0.2, ef)
    exp = reference(xl, xr, att, g, 0.2, ef)
    torch.testing.assert_close(out, exp, rtol=1e-10, atol=1e-12)
    go = torch.randn_like(out)
    for a, b in zip(grads(out, (xl, xr, att, ef), go), grads(exp, (xl, xr, att, ef), go)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_pytorch(dtype, device):
    """Error of the kernel (fp32 accumulation) vs float64 at most twice that of the same
    computation in plain PyTorch in `dtype`."""
    ei, n_src, n_dst = CASES["random"]
    g = Graph.from_edge_index(ei, (n_src, n_dst)).to(device)
    ins64 = make_inputs(n_src, n_dst, ei.shape[1], 4, 16, device=device)
    low = [t.detach().to(dtype).requires_grad_() for t in ins64]
    exact_in = [t.detach().to(dtype).double().requires_grad_() for t in ins64]
    out = ops.gatv2_attention(low[0], low[1], low[2], g, 0.2, low[3])
    ref_low = reference(low[0], low[1], low[2], g, 0.2, low[3])
    exact = reference(exact_in[0], exact_in[1], exact_in[2], g, 0.2, exact_in[3])
    # Norm-wise relative errors (a max over elements is one element's luck).
    eps = torch.finfo(dtype).eps
    err, err_torch = rel_err(out, exact), rel_err(ref_low, exact)
    assert err <= 2 * err_torch + 8 * eps, (err, err_torch)
    go = torch.randn_like(exact)
    for a, b, x in zip(grads(out, low, go.to(dtype)), grads(ref_low, low, go.to(dtype)),
                       grads(exact, exact_in, go)):
        e_k, e_t = rel_err(a, x), rel_err(b, x)
        assert e_k <= 3 * e_t + 16 * eps, (e_k, e_t)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_with_edge_feat_and_dropout(device):
    ei, n_src, n_dst = CASES["duplicates_and_self_loops"]
    g = Graph.from_edge_index(ei, (n_src, n_dst)).to(device)
    inputs = make_inputs(n_src, n_dst, ei.shape[1], 2, 3, device=device)
    seed = torch.tensor(987654321)

    def f(xl, xr, att, ef):
        return ops.gatv2_attention(xl, xr, att, g, 0.1, ef, dropout=0.25, training=True, seed=seed)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradcheck(lambda a, b, c: ops.gatv2_attention(a, b, c, g), inputs[:3])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_dropout", [False, True])
def test_opcheck(with_dropout, device):
    if not compiled_kernel():
        pytest.skip("extension not built")
    ei, n_src, n_dst = CASES["random"]
    g = Graph.from_edge_index(ei, (n_src, n_dst)).to(device)
    xl, xr, att, ef = make_inputs(n_src, n_dst, ei.shape[1], 2, 5, device=device)
    p, seed = (0.3, torch.tensor(11)) if with_dropout else (0.0, None)
    args = (xl, xr, att, g.rowptr, g.col, g.eid, *g.csc(), ef, 0.2, p, seed)
    torch.library.opcheck(torch.ops.neptune.gatv2_forward.default, args)
    out, lse = torch.ops.neptune.gatv2_forward(*args)
    bargs = (torch.randn_like(out), xl.detach(), xr.detach(), att.detach(), g.rowptr, g.col, g.eid,
             *g.csc(), ef.detach(), out.detach(), lse, 0.2, p, seed)
    torch.library.opcheck(torch.ops.neptune.gatv2_backward.default, bargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic(dtype, device):
    """Same bits across runs and thread counts (grad att is a fixed-order reduction)."""
    ei, n, _ = power_law_graph(3000, 40_000)
    g = Graph.from_edge_index(ei, (n, n)).to(device)
    xl, xr, att, ef = make_inputs(n, n, ei.shape[1], 4, 16, dtype=dtype, device=device)
    go = torch.randn(n, 4, 16, dtype=dtype, device=device)
    seed = torch.tensor(3)
    results = []
    threads = torch.get_num_threads()
    for n_threads in (threads, 1, max(threads, 2), threads):
        torch.set_num_threads(n_threads)
        try:
            out = ops.gatv2_attention(xl, xr, att, g, 0.2, ef, 0.1, True, seed=seed)
            results.append([out] + list(grads(out, (xl, xr, att, ef), go)))
        finally:
            torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_matches_reference_and_return_attention(device):
    ei, n_src, n_dst = CASES["isolated_destinations"]
    g = Graph.from_edge_index(ei, (n_src, n_dst)).to(device)
    xl, xr, att, ef = make_inputs(n_src, n_dst, ei.shape[1], 3, 4, device=device)
    a = ops.gatv2_attention(xl, xr, att, g, 0.2, ef, 0.4, True, seed=torch.tensor(5))
    b = ops.gatv2_attention(xl, xr, att, g, 0.2, ef, 0.4, True, seed=torch.tensor(6))
    assert not torch.equal(a, b)
    exp = reference(xl, xr, att, g, 0.2, ef, 0.4, 5)
    torch.testing.assert_close(a, exp, rtol=1e-12, atol=1e-12)
    out, alpha = ops.gatv2_attention(xl, xr, att, g, 0.2, ef, return_attention=True)
    dst = ei[1].to(device)
    sums = torch.zeros(n_dst, 3, dtype=alpha.dtype, device=device).index_add(0, dst, alpha)
    has = torch.bincount(dst, minlength=n_dst) > 0
    torch.testing.assert_close(sums[has], torch.ones_like(sums[has]))
    assert torch.equal(out[~has], torch.zeros_like(out[~has]))


def test_reference_fallback_matches(monkeypatch):
    ei, n_src, n_dst = CASES["random"]
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    xl, xr, att, ef = make_inputs(n_src, n_dst - 3, ei.shape[1], 2, 3)
    fused = ops.gatv2_attention(xl, xr, att, g, 0.2, ef)
    monkeypatch.setenv("NEPTUNE_FORCE_REFERENCE", "1")
    ref = ops.gatv2_attention(xl, xr, att, g, 0.2, ef)
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad, words", [
    (lambda a: dict(x_r=a["x_r"][:, :1]), "x_r must have shape"),
    (lambda a: dict(att=a["att"][:1]), "att must have shape"),
    (lambda a: dict(edge_feat=a["edge_feat"][:-1]), "edge_feat must have shape"),
    (lambda a: dict(x_l=a["x_l"][:-1]), "source nodes"),
    (lambda a: dict(negative_slope=float("nan")), "negative_slope"),
    (lambda a: dict(dropout=1.0), "dropout"),
])
def test_bad_inputs_name_the_argument(bad, words):
    ei, n_src, n_dst = CASES["random"]
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    xl, xr, att, ef = make_inputs(n_src, n_dst, ei.shape[1], 2, 3, requires_grad=False)
    args = dict(x_l=xl, x_r=xr, att=att, graph=g, edge_feat=ef)
    args.update(bad(args))
    with pytest.raises(ValueError, match=words):
        ops.gatv2_attention(**args)


def test_mixed_dtypes_run_in_the_promoted_dtype():
    """bfloat16 x_l/x_r (a projection under autocast) with a float32 att run, and return,
    float32, as GATv2Conv does; the same numbers as with the inputs cast."""
    ei, n_src, n_dst = CASES["random"]
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    xl, xr, att, ef = make_inputs(n_src, n_dst, ei.shape[1], 2, 3, requires_grad=False)
    bf = [t.to(torch.bfloat16) for t in (xl, xr, ef)]
    out = ops.gatv2_attention(bf[0], bf[1], att.float(), g, 0.2, bf[2])
    assert out.dtype == torch.float32
    want = ops.gatv2_attention(bf[0].float(), bf[1].float(), att.float(), g, 0.2, bf[2].float())
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_direct_op_calls_with_bad_graphs_raise():
    """A direct torch.ops call with a corrupt graph is a ValueError, never a crash (in a
    subprocess, so a crash would fail the test instead of the run)."""
    if not compiled_kernel():
        pytest.skip("extension not built")
    code = r"""
import torch, neptune_ext
from neptune_ext import Graph
g = Graph.from_edge_index(torch.tensor([[0, 1, 2], [1, 2, 0]]), (3, 3))
x = torch.randn(3, 2, 4)
att = torch.randn(2, 4)
bad = []
for col in (torch.tensor([0, 7, 1], dtype=torch.int32), torch.tensor([0, -1, 1], dtype=torch.int32),
            torch.tensor([0, 2**30, 1], dtype=torch.int32)):
    try:
        torch.ops.neptune.gatv2_forward(x, x, att, g.rowptr, col, g.eid, *g.csc(), None, 0.2, 0.0, None)
        bad.append("no error")
    except ValueError as e:
        assert "col" in str(e), e
try:
    torch.ops.neptune.gatv2_forward(x, x, att, g.rowptr, g.col, torch.tensor([0, 0, 1], dtype=torch.int32),
                                    *g.csc(), None, 0.2, 0.0, None)
    bad.append("duplicate eid accepted")
except ValueError as e:
    assert "eid" in str(e), e
out, lse = torch.ops.neptune.gatv2_forward(x, x, att, g.rowptr, g.col, g.eid, *g.csc(), None, 0.2, 0.0, None)
colptr, csc_row, csc_perm = g.csc()
try:
    torch.ops.neptune.gatv2_backward(torch.ones_like(out), x, x, att, g.rowptr, g.col, g.eid, colptr,
                                     csc_row.flip(0).contiguous(), csc_perm, None, out, lse, 0.2, 0.0, None)
    bad.append("bad transpose accepted")
except ValueError:
    pass
print("BAD" if bad else "OK", bad)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("OK"), proc.stdout + proc.stderr[-3000:]
