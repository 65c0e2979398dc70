"""The CUDA graph-transformer kernels (csrc/graph_attention/transformer_{fwd,bwd}_cuda.cu), run
on the CPU by tests/cuda_emulation: warps as 32 fibers, shuffles as real rendezvous, outputs
and scratch poisoned with NaN. float64 against the float64 reference (outputs, and every
gradient through autograd on it); lower precisions against the CPU kernel fed the same
rounded inputs. Every lane layout (1 to 32 features per lane; C = 1, 3, 8, 32, 33, 64: powers
of two below, at and above 32, and not), H * C up to the limit, edge features on and off,
dropout (masks checked exactly against the CPU kernel and the reference), both index types,
empty graphs, isolated destinations, a hub and infinite logits. Races between warps and
speed are left to a GPU."""
import math
import os
import sys

import pytest
import torch

import neptune_ext
from neptune_ext import Graph
from neptune_ext.reference import dropout_keep_mask, transformer_attention_reference
from graph_attention_checks import TOL_GRAD, TOL_OUT, rel_err
from graphs import cases, hub_graph, random_graph

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emulation"))
import build as emulation  # noqa: E402

pytestmark = pytest.mark.slow

MAX_HC = 1024  # kTransformerMaxHC (csrc/graph_attention/transformer_cuda.cuh)
GRADS = ("q", "k", "v", "edge_feat")


@pytest.fixture(scope="module")
def emu():
    from torch.utils import cpp_extension
    if os.environ.get("NEPTUNE_SKIP_EMULATION", "0") == "1":
        pytest.skip("NEPTUNE_SKIP_EMULATION=1")
    if not cpp_extension.is_ninja_available():
        pytest.skip("ninja is needed to build the CUDA emulation")
    return emulation.load("default")


def cpu_op():
    """torch.ops.neptune (the CPU kernel), or None when the extension is not built."""
    if neptune_ext._ext._C is not None and hasattr(torch.ops.neptune, "transformer_forward"):
        return torch.ops.neptune
    return None


def with_index(g, index):
    if index == "int32":
        assert g.rowptr.dtype == torch.int32
        return g
    g2 = Graph(g.rowptr.long(), g.col.long(), g.eid.long(), g.edge_index, g.num_src, g.num_dst)
    g2._csc = tuple(t.long() for t in g.csc())
    return g2


def inputs(g, H, C, dtype, edge_feat=True):
    def r(*shape):
        return torch.randn(*shape, dtype=torch.float64).to(dtype)
    return (r(g.num_dst, H, C), r(g.num_src, H, C), r(g.num_src, H, C),
            r(g.num_edges, H, C) if edge_feat else None)


def run(ops, g, q, k, v, ef, go, scale, p=0.0, seed=None, poison=True):
    out, lse = ops.transformer_forward(q, k, v, g.rowptr, g.col, g.eid, *g.csc(), ef, scale, p, seed)
    grads = ops.transformer_backward(go, q, k, v, g.rowptr, g.col, g.eid, *g.csc(), ef, out, lse,
                                     scale, p, seed)
    if poison:
        names = ("out", "lse") + tuple("grad_" + n for n in GRADS)
        for name, t in zip(names, (out, lse) + tuple(grads)):
            assert not torch.isnan(t).any(), f"{name}: elements left unwritten (NaN poison)"
    return out, lse, list(grads)


def check(ops, g, H, C, dtype, edge_feat=True, p=0.0):
    q, k, v, ef = inputs(g, H, C, dtype, edge_feat)
    go = torch.randn(g.num_dst, H, C, dtype=torch.float64).to(dtype)
    scale = 1.0 / math.sqrt(C)
    seed = torch.tensor(4321) if p > 0 else None
    out, lse, grads = run(ops, g, q, k, v, ef, go, scale, p, seed)
    assert out.dtype == dtype and out.shape == (g.num_dst, H, C)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert lse.shape == (g.num_dst, H)
    if edge_feat:
        assert grads[3].shape == ef.shape
    else:
        assert grads[3].numel() == 0
        grads = grads[:3]
    if dtype == torch.float64:
        ins = [t.detach().clone().requires_grad_() for t in (q, k, v, ef) if t is not None]
        ref = transformer_attention_reference(ins[0], ins[1], ins[2], g.edge_index[0], g.edge_index[1],
                                              g.num_dst, scale, ins[3] if edge_feat else None, p,
                                              None if seed is None else int(seed))
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        exp = torch.autograd.grad(ref, ins, go, allow_unused=True)
        for name, a, b in zip(GRADS, grads, exp):
            b = torch.zeros_like(a) if b is None else b
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11, msg=lambda m: f"grad {name}: {m}")
    cpu = cpu_op()
    if cpu is None:
        if dtype == torch.float64:
            return
        pytest.skip("the compiled extension (CPU kernel, the oracle below float64) is not built")
    c_out, c_lse = cpu.transformer_forward(q, k, v, g.rowptr, g.col, g.eid, *g.csc(), ef, scale, p, seed)
    c_grads = cpu.transformer_backward(go, q, k, v, g.rowptr, g.col, g.eid, *g.csc(), ef, c_out, c_lse,
                                       scale, p, seed)
    assert rel_err(out, c_out) <= TOL_OUT[dtype], ("out", rel_err(out, c_out))
    assert rel_err(lse, c_lse) <= TOL_OUT[dtype], ("lse", rel_err(lse, c_lse))
    if dtype != torch.float64:  # (float64 gradients were held to the reference above; the CPU
        # kernel's would add nothing but the noise of sums that cancel, like grad q of a row
        # with one in-edge)
        for name, a, b in zip(GRADS, grads, c_grads):
            assert rel_err(a, b) <= TOL_GRAD[dtype], (name, rel_err(a, b))


@pytest.mark.parametrize("name", list(cases()))
@pytest.mark.parametrize("index", ["int32", "int64"])
def test_cases_float64(emu, name, index):
    ei, n_src, n_dst = cases()[name]
    g = with_index(Graph.from_edge_index(ei, (n_src, n_dst)), index)
    check(emu, g, 3, 5, torch.float64)
    check(emu, g, 2, 8, torch.float64, edge_feat=False, p=0.3)


@pytest.mark.parametrize("H,C", [(1, 1), (4, 1), (3, 3), (11, 3), (4, 8), (2, 32), (1, 33), (3, 33),
                                 (2, 64), (3, 64), (16, 64), (1, 1024), (31, 33)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_layouts(emu, H, C, dtype):
    ei, n_src, n_dst = random_graph(25, 20, 120)
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    check(emu, g, H, C, dtype)


@pytest.mark.parametrize("H,C", [(2, 3), (4, 8), (2, 33), (3, 64)])
@pytest.mark.parametrize("edge_feat", [True, False])
def test_float16(emu, H, C, edge_feat):
    ei, n_src, n_dst = random_graph(25, 20, 120)
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    check(emu, g, H, C, torch.float16, edge_feat=edge_feat)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("index", ["int32", "int64"])
def test_dropout(emu, dtype, index):
    ei, n_src, n_dst = random_graph(30, 24, 200)
    g = with_index(Graph.from_edge_index(ei, (n_src, n_dst)), index)
    check(emu, g, 3, 8, dtype, p=0.4)
    check(emu, g, 2, 33, dtype, edge_feat=False, p=0.2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_masks_exact(emu, dtype):
    """One in-edge per destination: a = 1, so out is exactly 0 on a dropped (edge, head) and
    v / (1 - p) on a kept one; the zero pattern is the mask, compared bit for bit with the
    CPU kernel and the reference's RNG (edge ids permuted, so the mask follows the caller's
    edge id, not the CSR position)."""
    n, H, C, p = 64, 5, 3, 0.5
    perm = torch.randperm(n)
    ei = torch.stack([torch.randint(0, 10, (n,)), perm])  # edge e -> destination perm[e]
    g = Graph.from_edge_index(ei, (10, n))
    q, k, v, ef = inputs(g, H, C, dtype, edge_feat=True)
    v = v.abs() + 1  # no zero in v, so a zero in out is a dropped weight
    ef = ef.abs()
    go = torch.randn(n, H, C, dtype=torch.float64).to(dtype)
    seed = torch.tensor(987654321)
    out, _, grads = run(emu, g, q, k, v, ef, go, 0.5, p, seed)
    keep = dropout_keep_mask(int(seed), torch.arange(n), H, p)  # [E, H], caller's edge order
    expect_zero = torch.zeros(n, H, dtype=torch.bool)
    expect_zero[perm] = ~keep
    assert torch.equal((out == 0).all(-1), expect_zero)
    assert torch.equal((out == 0).any(-1), expect_zero)
    assert 0 < int(expect_zero.sum()) < n * H
    cpu = cpu_op()
    if cpu is None:
        pytest.skip("the compiled extension (CPU kernel) is not built")
    c_out, c_lse = cpu.transformer_forward(q, k, v, g.rowptr, g.col, g.eid, *g.csc(), ef, 0.5, p, seed)
    assert torch.equal(out == 0, c_out == 0)
    # grad v of a source: a' dOut summed over its edges; grad edge_feat carries a' dOut_i.
    c_grads = cpu.transformer_backward(go, q, k, v, g.rowptr, g.col, g.eid, *g.csc(), ef, c_out, c_lse,
                                       0.5, p, seed)
    # With one in-edge a destination's softmax is constant: the gradients of q and k are 0
    # up to rounding (dS = a' g - a D), judged against the scale of grad v.
    scale = float(c_grads[2].double().norm())
    for name, a, b in zip(GRADS, grads, c_grads):
        if name in ("q", "k"):
            assert float((a.double() - b.double()).norm()) <= TOL_GRAD[dtype] * scale, name
        else:
            assert rel_err(a, b) <= TOL_GRAD[dtype], name


@pytest.mark.parametrize("index", ["int32", "int64"])
def test_hub(emu, index):
    ei, n_src, n_dst = hub_graph(3000, 200)
    g = with_index(Graph.from_edge_index(ei, (n_src, n_dst)), index)
    check(emu, g, 2, 4, torch.float64)
    check(emu, g, 2, 4, torch.float32, p=0.1)


def test_isolated_sources_and_destinations(emu):
    # Sources 10..19 feed nobody (zero grad k, grad v); destinations 8..15 receive nothing
    # (out 0, lse 0, grad q 0).
    ei = torch.stack([torch.randint(0, 10, (40,)), torch.randint(0, 8, (40,))])
    g = Graph.from_edge_index(ei, (20, 16))
    check(emu, g, 2, 3, torch.float64)
    q, k, v, ef = inputs(g, 2, 3, torch.float32)
    go = torch.randn(16, 2, 3)
    out, lse, grads = run(emu, g, q, k, v, ef, go, 0.7)
    assert (out[8:] == 0).all() and (lse[8:] == 0).all() and (grads[0][8:] == 0).all()
    assert (grads[1][10:] == 0).all() and (grads[2][10:] == 0).all()


def test_infinite_logits_match_cpu(emu):
    """Infinite logits follow the shared online_softmax_step, head 0: destination 0 has a
    -inf and a +inf logit (a NaN row), destination 1 only -inf logits (a masked row: out 0,
    lse 0), destination 2 a -inf logit beside a finite one (the edge is masked). Head 1 is
    finite. The emulated kernels agree with the CPU kernel, NaN for NaN."""
    cpu = cpu_op()
    if cpu is None:
        pytest.skip("the compiled extension (CPU kernel) is not built")
    src = torch.tensor([0, 1, 0, 2, 3, 4, 1, 3])
    dst = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    g = Graph.from_edge_index(torch.stack([src, dst]), (5, 4))
    q, k, v, _ = inputs(g, 2, 2, torch.float32, edge_feat=False)
    inf = float("inf")
    q[0, 0] = torch.tensor([inf, 0.0])
    q[1, 0] = torch.tensor([inf, 0.0])
    q[2, 0] = torch.tensor([1.0, 1.0])
    k[0, 0] = torch.tensor([-1.0, 0.5])
    k[1, 0] = torch.tensor([1.0, 0.5])
    k[2, 0] = torch.tensor([-2.0, 0.5])
    k[4, 0] = torch.tensor([-inf, -inf])
    go = torch.randn(4, 2, 2)
    out, lse, grads = run(emu, g, q, k, v, None, go, 0.5, poison=False)
    assert torch.isnan(out[0, 0]).all() and (out[1, 0] == 0).all() and lse[1, 0] == 0
    assert torch.isfinite(out[2]).all() and torch.isfinite(out[:, 1]).all()
    torch.testing.assert_close(out[2, 0], v[3, 0])  # the masked edge has weight 0
    c_out, c_lse = cpu.transformer_forward(q, k, v, g.rowptr, g.col, g.eid, *g.csc(), None, 0.5, 0.0,
                                           None)
    c_grads = cpu.transformer_backward(go, q, k, v, g.rowptr, g.col, g.eid, *g.csc(), None, c_out,
                                       c_lse, 0.5, 0.0, None)
    for a, b in zip((out, lse, *grads[:3]), (c_out, c_lse, *c_grads[:3])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_refused_shapes(emu):
    ei, n_src, n_dst = random_graph(5, 5, 10)
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    for H, C in [(2, MAX_HC // 2 + 1), (1, MAX_HC + 1), (3, 0)]:
        q, k, v, _ = inputs(g, H, C, torch.float32, edge_feat=False)
        with pytest.raises(RuntimeError, match="H \\* C must be in \\[1, 1024\\]"):
            emu.transformer_forward(q, k, v, g.rowptr, g.col, g.eid, *g.csc(), None, 1.0, 0.0, None)
        with pytest.raises(RuntimeError, match="H \\* C must be in \\[1, 1024\\]"):
            emu.transformer_backward(q, q, k, v, g.rowptr, g.col, g.eid, *g.csc(), None, q,
                                     torch.zeros(n_dst, H), 1.0, 0.0, None)
    # The CPU kernel's entry checks run first (shared: check_transformer_entry).
    q, k, v, _ = inputs(g, 2, 4, torch.float32, edge_feat=False)
    with pytest.raises(RuntimeError, match="k must be"):
        emu.transformer_forward(q, k[:, :1], v, g.rowptr, g.col, g.eid, *g.csc(), None, 1.0, 0.0, None)
    with pytest.raises(RuntimeError, match="dropout must be in"):
        emu.transformer_forward(q, k, v, g.rowptr, g.col, g.eid, *g.csc(), None, 1.0, 1.0, None)
