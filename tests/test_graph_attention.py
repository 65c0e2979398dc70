"""Sparse graph attention (GAT): what GAT alone has - edge logits that are infinite or NaN
and the negative slope's bounds. What every attention variant has (the kernels against the
float64 reference, gradients, dropout, bad input) is in test_attention_ops.py."""
import pytest
import torch

import neptune_ext
from neptune_ext import Graph, ops
from neptune_ext.attention.reference import sparse_graph_attention_reference


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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["masked_first", "masked_last", "all_masked", "plus_inf", "nan"])
def test_infinite_logits_kernel_and_reference_agree(kind, dtype):
    # float32 takes the CPU kernels' own exp (attention_cpu.h: exp_acc), float64 libm's
    ei, h, s, el = _inf_case(kind)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    h, s, el = h.to(dtype), s.to(dtype), el.to(dtype)
    g = Graph.from_edge_index(ei, 6)
    got = ops.sparse_graph_attention(h, s, s, g, edge_logits=el)
    want = sparse_graph_attention_reference(h.double(), s.double(), s.double(), ei[0], ei[1], 6, 0.2,
                                            el.double())
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, equal_nan=True)
    if kind in ("masked_first", "masked_last"):
        # A mask equals dropping the edge.
        keep = torch.isfinite(el[:, 0])
        g2 = Graph.from_edge_index(ei[:, keep], 6)
        torch.testing.assert_close(got, ops.sparse_graph_attention(h, s, s, g2,
                                   edge_logits=el[keep]), rtol=tol, atol=tol)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logit_gaps_across_the_float_range(dtype):
    """Weights exp(logit - max) from 1 down past float's smallest normal (gaps of 0 to 150):
    the CPU kernels compute them with their own exp (exact to 1 ulp, 0 below e^-86.5); the
    output and gradients match the float64 reference at float32's precision (bf16 at its own:
    its inputs are rounded, the accumulation is float32)."""
    torch.manual_seed(7)
    deg = 40
    gaps = torch.linspace(0, 150, deg, dtype=torch.float64)
    ei = torch.stack([torch.arange(deg), torch.zeros(deg, dtype=torch.long)])
    h = torch.randn(deg, 2, 4, dtype=torch.float64)
    s = torch.zeros(deg, 2, dtype=torch.float64)
    el = torch.stack([-gaps, -gaps.flip(0)], 1)  # both heads, the largest weight first and last
    g = Graph.from_edge_index(ei, (deg, 1))
    leaves = [t.to(dtype).requires_grad_() for t in (h, s, el)]
    got = ops.sparse_graph_attention(leaves[0], leaves[1], leaves[1][:1], g, edge_logits=leaves[2])
    ref = [t.detach().double().requires_grad_() for t in leaves]
    want = sparse_graph_attention_reference(ref[0], ref[1], ref[1][:1], ei[0], ei[1], 1, 0.2, ref[2])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    go = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, leaves, go.to(dtype)), torch.autograd.grad(want, ref, go)):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


@pytest.mark.parametrize("slope", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_negative_slope_is_rejected(slope):
    with pytest.raises(ValueError, match="negative_slope"):
        neptune_ext.nn.GraphAttention(4, 4, negative_slope=slope)
    g = Graph.from_edge_index(torch.tensor([[0, 1], [1, 0]]), 2)
    h, s = torch.randn(2, 1, 3), torch.randn(2, 1)
    with pytest.raises(ValueError, match="negative_slope"):
        ops.sparse_graph_attention(h, s, s, g, negative_slope=slope)
