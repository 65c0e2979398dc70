"""The graph-transformer attention op: the fused CPU kernel against the float64 reference,
gradients (gradcheck, gradgradcheck, opcheck), low precision, determinism, dropout,
adversarial graphs and bad input."""
import subprocess
import sys

import pytest
import torch

import neptune_ext
from neptune_ext import Graph, ops
from neptune_ext.reference import transformer_attention_reference

from conftest import _SEED, DEVICES
from graph_attention_checks import rel_err
from graphs import cases, hub_graph, power_law_graph

with torch.random.fork_rng():  # the graphs follow the run's seed too (replayable)
    torch.manual_seed(_SEED)
    CASES = cases()


def make_inputs(n_src, n_dst, n_edges, H, C, dtype=torch.float64, device="cpu", edge_feat=True,
                requires_grad=True):
    def r(*shape):
        return torch.randn(*shape, dtype=torch.float64).to(device=device, dtype=dtype) \
            .requires_grad_(requires_grad)
    return r(n_dst, H, C), r(n_src, H, C), r(n_src, H, C), (r(n_edges, H, C) if edge_feat else None)


def reference(q, k, v, g, ef=None, scale=None, p=0.0, seed=None):
    scale = q.shape[2] ** -0.5 if scale is None else scale
    return transformer_attention_reference(q, k, v, g.edge_index[0], g.edge_index[1], g.num_dst, scale,
                                           ef, p, None if seed is None else int(seed))


def grads(out, inputs, grad_out):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


def compiled_kernel():
    return neptune_ext._ext._C is not None and hasattr(torch.ops.neptune, "transformer_forward")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("with_edge_feat", [False, True])
def test_matches_reference_float64(name, with_edge_feat, device):
    ei, n_src, n_dst = CASES[name]
    g = Graph.from_edge_index(ei, (n_src, n_dst)).to(device)
    ins = make_inputs(n_src, n_dst, ei.shape[1], 3, 5, device=device, edge_feat=with_edge_feat)
    scale = float(torch.rand(())) + 0.1
    out = ops.transformer_attention(*ins[:3], g, scale, ins[3])
    exp = reference(*ins[:3], g, ins[3], scale)
    torch.testing.assert_close(out, exp, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(out)
    for a, b in zip(grads(out, ins, go), grads(exp, ins, go)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("device", DEVICES)
def test_hub_with_100k_in_edges(device):
    ei, n_src, n_dst = hub_graph()
    g = Graph.from_edge_index(ei, (n_src, n_dst)).to(device)
    ins = make_inputs(n_src, n_dst, ei.shape[1], 2, 4, device=device)
    out = ops.transformer_attention(*ins[:3], g, edge_feat=ins[3])
    exp = reference(*ins[:3], g, ins[3])
    torch.testing.assert_close(out, exp, rtol=1e-10, atol=1e-12)
    go = torch.randn_like(out)
    for a, b in zip(grads(out, ins, go), grads(exp, ins, go)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_pytorch(dtype, device):
    """Error of the kernel (fp32 accumulation) vs float64 at most twice that of the same
    computation in plain PyTorch in `dtype`, in norm."""
    ei, n_src, n_dst = CASES["random"]
    g = Graph.from_edge_index(ei, (n_src, n_dst)).to(device)
    ins64 = make_inputs(n_src, n_dst, ei.shape[1], 4, 16, device=device)
    low = [t.detach().to(dtype).requires_grad_() for t in ins64]
    exact_in = [t.detach().to(dtype).double().requires_grad_() for t in ins64]
    out = ops.transformer_attention(*low[:3], g, edge_feat=low[3])
    ref_low = reference(*low[:3], g, low[3])
    exact = reference(*exact_in[:3], g, exact_in[3])
    eps = torch.finfo(dtype).eps
    err, err_torch = rel_err(out, exact), rel_err(ref_low, exact)
    assert err <= 2 * err_torch + 8 * eps, (err, err_torch)
    go = torch.randn_like(exact)
    for a, b, x in zip(grads(out, low, go.to(dtype)), grads(ref_low, low, go.to(dtype)),
                       grads(exact, exact_in, go)):
        e_k, e_t = rel_err(a, x), rel_err(b, x)
        assert e_k <= 3 * e_t + 16 * eps, (e_k, e_t)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_and_gradgradcheck(device):
    ei, n_src, n_dst = CASES["duplicates_and_self_loops"]
    g = Graph.from_edge_index(ei, (n_src, n_dst)).to(device)
    ins = make_inputs(n_src, n_dst, ei.shape[1], 2, 3, device=device)
    seed = torch.tensor(987654321)

    def f(q, k, v, ef):
        return ops.transformer_attention(q, k, v, g, 0.7, ef, dropout=0.25, training=True, seed=seed)

    assert torch.autograd.gradcheck(f, ins)
    assert torch.autograd.gradgradcheck(f, ins)
    assert torch.autograd.gradcheck(lambda q, k, v: ops.transformer_attention(q, k, v, g), ins[:3])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_dropout", [False, True])
def test_opcheck(with_dropout, device):
    if not compiled_kernel():
        pytest.skip("extension not built")
    ei, n_src, n_dst = CASES["random"]
    g = Graph.from_edge_index(ei, (n_src, n_dst)).to(device)
    q, k, v, ef = make_inputs(n_src, n_dst, ei.shape[1], 2, 5, device=device)
    p, seed = (0.3, torch.tensor(11)) if with_dropout else (0.0, None)
    args = (q, k, v, g.rowptr, g.col, g.eid, *g.csc(), ef, 0.4, p, seed)
    torch.library.opcheck(torch.ops.neptune.transformer_forward.default, args)
    out, lse = torch.ops.neptune.transformer_forward(*args)
    bargs = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), g.rowptr, g.col, g.eid,
             *g.csc(), ef.detach(), out.detach(), lse, 0.4, p, seed)
    torch.library.opcheck(torch.ops.neptune.transformer_backward.default, bargs)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    ei, n_src, n_dst = CASES["random"]
    g = Graph.from_edge_index(ei, (n_src, n_dst)).to(device)
    ins = make_inputs(n_src, n_dst, ei.shape[1], 2, 4, dtype=torch.float32, device=device)
    f = torch.compile(lambda q, k, v, ef: ops.transformer_attention(q, k, v, g, None, ef), fullgraph=True)
    out = f(*ins)
    exp = ops.transformer_attention(*ins[:3], g, None, ins[3])
    torch.testing.assert_close(out, exp)
    go = torch.randn_like(out)
    for a, b in zip(grads(out, ins, go), grads(exp, ins, go)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic(dtype, device):
    """Same bits across runs and thread counts (no atomics anywhere)."""
    ei, n, _ = power_law_graph(3000, 40_000)
    g = Graph.from_edge_index(ei, (n, n)).to(device)
    ins = make_inputs(n, n, ei.shape[1], 4, 16, dtype=dtype, device=device)
    go = torch.randn(n, 4, 16, dtype=dtype, device=device)
    seed = torch.tensor(3)
    results = []
    threads = torch.get_num_threads()
    for n_threads in (threads, 1, max(threads, 2), threads):
        torch.set_num_threads(n_threads)
        try:
            out = ops.transformer_attention(*ins[:3], g, None, ins[3], 0.1, True, seed=seed)
            results.append([out] + list(grads(out, ins, go)))
        finally:
            torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_matches_reference_and_return_attention(device):
    ei, n_src, n_dst = CASES["isolated_destinations"]
    g = Graph.from_edge_index(ei, (n_src, n_dst)).to(device)
    ins = make_inputs(n_src, n_dst, ei.shape[1], 3, 4, device=device)
    a = ops.transformer_attention(*ins[:3], g, None, ins[3], 0.4, True, seed=torch.tensor(5))
    b = ops.transformer_attention(*ins[:3], g, None, ins[3], 0.4, True, seed=torch.tensor(6))
    assert not torch.equal(a, b)
    exp = reference(*ins[:3], g, ins[3], None, 0.4, 5)
    torch.testing.assert_close(a, exp, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(a)
    for x, y in zip(grads(a, ins, go), grads(exp, ins, go)):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-11)
    out, alpha = ops.transformer_attention(*ins[:3], g, None, ins[3], return_attention=True)
    dst = ei[1].to(device)
    sums = torch.zeros(n_dst, 3, dtype=alpha.dtype, device=device).index_add(0, dst, alpha)
    has = torch.bincount(dst, minlength=n_dst) > 0
    torch.testing.assert_close(sums[has], torch.ones_like(sums[has]))
    assert torch.equal(out[~has], torch.zeros_like(out[~has]))


def test_infinite_logits_follow_torch_softmax():
    """A -inf logit is a mask (weight 0); a row of only masked logits gives 0, not NaN."""
    ei = torch.tensor([[0, 1, 2, 0], [0, 0, 0, 1]])
    g = Graph.from_edge_index(ei, (3, 2))
    q = torch.ones(2, 1, 1, dtype=torch.float64)
    k = torch.tensor([[[1.0]], [[-float("inf")]], [[2.0]]], dtype=torch.float64)
    v = torch.randn(3, 1, 1, dtype=torch.float64)
    out = ops.transformer_attention(q, k, v, g, 1.0)
    exp = reference(q, k, v, g, None, 1.0)
    torch.testing.assert_close(out, exp, rtol=1e-12, atol=1e-12)
    assert not torch.isnan(out[0]).any()


def test_reference_fallback_matches(monkeypatch):
    ei, n_src, n_dst = CASES["random"]
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    ins = make_inputs(n_src, n_dst, ei.shape[1], 2, 3)
    fused = ops.transformer_attention(*ins[:3], g, None, ins[3])
    monkeypatch.setenv("NEPTUNE_FORCE_REFERENCE", "1")
    ref = ops.transformer_attention(*ins[:3], g, None, ins[3])
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad, words", [
    (lambda a: dict(k=a["k"][:, :1]), "k must have shape"),
    (lambda a: dict(v=a["v"][:-1]), "v must have the shape of k"),
    (lambda a: dict(q=a["q"][:-1]), "destination nodes"),
    (lambda a: dict(k=a["k"][:-1], v=a["v"][:-1]), "source nodes"),
    (lambda a: dict(edge_feat=a["edge_feat"][:-1]), "edge_feat must have shape"),
    (lambda a: dict(scale=float("nan")), "scale"),
    (lambda a: dict(dropout=1.0), "dropout"),
    (lambda a: dict(q=a["q"].long()), "q must be a floating-point"),
    (lambda a: dict(graph=None), "graph must be a neptune_ext.Graph"),
    (lambda a: dict(q=a["q"][:, :, :0]), "C > 0"),
])
def test_bad_inputs_name_the_argument(bad, words):
    ei, n_src, n_dst = CASES["random"]
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    q, k, v, ef = make_inputs(n_src, n_dst, ei.shape[1], 2, 3, requires_grad=False)
    args = dict(q=q, k=k, v=v, graph=g, edge_feat=ef)
    args.update(bad(args))
    with pytest.raises(ValueError, match=words):
        ops.transformer_attention(**args)


def test_mixed_dtypes_run_in_the_promoted_dtype():
    ei, n_src, n_dst = CASES["random"]
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    q, k, v, ef = make_inputs(n_src, n_dst, ei.shape[1], 2, 3, requires_grad=False)
    out = ops.transformer_attention(q.bfloat16(), k.float(), v.bfloat16(), g, None, ef.bfloat16())
    assert out.dtype == torch.float32
    want = ops.transformer_attention(q.bfloat16().float(), k.float(), v.bfloat16().float(), g, None,
                                     ef.bfloat16().float())
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_direct_op_calls_with_bad_graphs_raise():
    """A direct torch.ops call with a corrupt graph or mismatched tensors is an error naming
    the argument, never a crash (in a subprocess, so a crash fails the test, not the run)."""
    if not compiled_kernel():
        pytest.skip("extension not built")
    code = r"""
import torch, neptune_ext
from neptune_ext import Graph
g = Graph.from_edge_index(torch.tensor([[0, 1, 2], [1, 2, 0]]), (3, 3))
x = torch.randn(3, 2, 4)
op = torch.ops.neptune.transformer_forward
for col, word in ((torch.tensor([0, 7, 1], dtype=torch.int32), "col"),
                  (torch.tensor([0, -1, 1], dtype=torch.int32), "col")):
    try:
        op(x, x, x, g.rowptr, col, g.eid, *g.csc(), None, 0.5, 0.0, None)
        raise SystemExit("no error for a bad col")
    except ValueError as e:
        assert word in str(e), e
for args, word in (((x[:2], x, x), "rowptr"), ((x, x, x[:, :1]), "v must"), ((x, x[:, :, :2], x[:, :, :2]), "k must")):
    try:
        op(*args, g.rowptr, g.col, g.eid, *g.csc(), None, 0.5, 0.0, None)
        raise SystemExit("no error for " + word)
    except RuntimeError as e:
        assert word in str(e), e
out, lse = op(x, x, x, g.rowptr, g.col, g.eid, *g.csc(), None, 0.5, 0.0, None)
colptr, csc_row, csc_perm = g.csc()
try:
    torch.ops.neptune.transformer_backward(torch.ones_like(out), x, x, x, g.rowptr, g.col, g.eid, colptr,
                                           csc_row, csc_perm.flip(0), None, out, lse, 0.5, 0.0, None)
    raise SystemExit("a wrong CSC was accepted")
except ValueError:
    pass
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, (res.stdout + res.stderr)[-3000:]
