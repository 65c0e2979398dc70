"""The CUDA GATv2 kernels (csrc/graph_attention/gatv2_{fwd,bwd}_cuda.cu), run on the CPU by
tests/cuda_emulation: warps as 32 fibers, shuffles as real rendezvous, outputs and
scratch poisoned with NaN. float64 against the float64 reference; lower precisions
against the CPU kernel fed the same rounded inputs. Every lane layout (1 to 32 features
per lane, C a power of two below and above 32, C not a power of two), phantom rows,
edge features, dropout and both index types. Races between warps and speed are left to
a GPU (tests/test_gatv2.py runs its cases on CUDA when one is present)."""
import os
import sys

import pytest
import torch

import neptune_ext
from neptune_ext import Graph
from neptune_ext.reference import gatv2_attention_reference
from graph_attention_checks import TOL_GRAD, TOL_OUT, rel_err
from graphs import cases, random_graph

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emulation"))
import build as emulation  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def emu():
    from torch.utils import cpp_extension
    if os.environ.get("NEPTUNE_SKIP_EMULATION", "0") == "1":
        pytest.skip("NEPTUNE_SKIP_EMULATION=1")
    if not cpp_extension.is_ninja_available():
        pytest.skip("ninja is needed to build the CUDA emulation")
    return emulation.load("default")


def inputs(g, n_dst, H, C, dtype, edge_feat=True):
    def r(*shape):
        return torch.randn(*shape, dtype=torch.float64).to(dtype)
    # att scaled like a glorot-initialized one: logits of order 1 (with 1024 unit terms per
    # logit the softmax is one-hot and every gradient is cancellation noise).
    att = (torch.randn(H, C, dtype=torch.float64) / C**0.5).to(dtype)
    return r(g.num_src, H, C), r(n_dst, H, C), att, (r(g.num_edges, H, C) if edge_feat else None)


def run(ops, g, xl, xr, att, ef, go, slope=0.2, p=0.0, seed=None):
    out, lse = ops.gatv2_forward(xl, xr, att, g.rowptr, g.col, g.eid, *g.csc(), ef, slope, p, seed)
    grads = ops.gatv2_backward(go, xl, xr, att, g.rowptr, g.col, g.eid, *g.csc(), ef, out, lse, slope,
                               p, seed)
    names = ("out", "lse", "grad_x_l", "grad_x_r", "grad_att", "grad_edge_feat")
    for name, t in zip(names, (out, lse) + tuple(grads)):
        assert not torch.isnan(t).any(), f"{name}: elements left unwritten (NaN poison)"
    return out, lse, list(grads)


def check(ops, g, H, C, dtype, n_dst=None, edge_feat=True, p=0.0, slope=0.2):
    n_dst = g.num_dst if n_dst is None else n_dst
    xl, xr, att, ef = inputs(g, n_dst, H, C, dtype, edge_feat)
    go = torch.randn(n_dst, H, C, dtype=torch.float64).to(dtype)
    seed = torch.tensor(4321) if p > 0 else None
    out, lse, grads = run(ops, g, xl, xr, att, ef, go, slope, p, seed)
    if not edge_feat:
        grads = grads[:3]
    if dtype == torch.float64:
        ins = [t.detach().clone().requires_grad_() for t in (xl, xr, att, ef) if t is not None]
        ef_r = ins[3] if edge_feat else None
        # Rows beyond x_r are ignored: the reference gets zero rows there and its output is
        # cut (edge ids, and so the dropout mask, stay the caller's).
        pad = torch.zeros(g.num_dst - n_dst, H, C, dtype=dtype)
        ref = gatv2_attention_reference(ins[0], torch.cat([ins[1], pad]), ins[2], g.edge_index[0],
                                        g.edge_index[1], g.num_dst, slope, ef_r, p,
                                        None if seed is None else int(seed))[:n_dst]
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        exp = torch.autograd.grad(ref, ins, go, allow_unused=True)
        for name, a, b in zip(("x_l", "x_r", "att", "edge_feat"), grads, exp):
            b = torch.zeros_like(a) if b is None else b
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11, msg=lambda m: f"grad {name}: {m}")
    if neptune_ext._ext._C is not None and hasattr(torch.ops.neptune, "gatv2_forward"):
        c_out, c_lse = torch.ops.neptune.gatv2_forward(xl, xr, att, g.rowptr, g.col, g.eid, *g.csc(), ef,
                                                       slope, p, seed)
        c_grads = torch.ops.neptune.gatv2_backward(go, xl, xr, att, g.rowptr, g.col, g.eid, *g.csc(), ef,
                                                   c_out, c_lse, slope, p, seed)
        assert rel_err(out, c_out) <= TOL_OUT[dtype]
        assert rel_err(lse, c_lse) <= TOL_OUT[dtype]
        if dtype != torch.float64:  # (float64 gradients were held to the reference above)
            for name, a, b in zip(("x_l", "x_r", "att", "edge_feat"), grads, c_grads):
                assert rel_err(a, b) <= TOL_GRAD[dtype], name


@pytest.mark.parametrize("name", list(cases()))
@pytest.mark.parametrize("index", ["int32", "int64"])
def test_cases_float64(emu, name, index):
    ei, n_src, n_dst = cases()[name]
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    if index == "int64":
        g2 = Graph(g.rowptr.long(), g.col.long(), g.eid.long(), g.edge_index, g.num_src, g.num_dst)
        g2._csc = tuple(t.long() for t in g.csc())
        g = g2
    check(emu, g, 3, 5, torch.float64)
    check(emu, g, 2, 4, torch.float64, edge_feat=False, p=0.3)


@pytest.mark.parametrize("H,C", [(1, 1), (3, 5), (2, 4), (8, 4), (4, 32), (2, 64), (5, 40), (1, 1024),
                                 (3, 96)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_layouts(emu, H, C, dtype):
    ei, n_src, n_dst = random_graph(25, 20, 120)
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    check(emu, g, H, C, dtype)


def test_ignored_rows_and_dropout(emu):
    ei, n_src, n_dst = random_graph(30, 24, 200)
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    check(emu, g, 3, 8, torch.float64, n_dst=n_dst - 5)
    check(emu, g, 3, 8, torch.float64, n_dst=n_dst - 5, p=0.4)
    check(emu, g, 2, 6, torch.float32, n_dst=n_dst - 1, p=0.2)


def test_too_wide_rows_are_refused(emu):
    ei, n_src, n_dst = random_graph(5, 5, 10)
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    xl, xr, att, _ = inputs(g, n_dst, 2, 513, torch.float32)
    with pytest.raises(RuntimeError, match="H \\* C must be in"):
        emu.gatv2_forward(xl, xr, att, g.rowptr, g.col, g.eid, *g.csc(), None, 0.2, 0.0, None)
