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
