"""The GATv2 op: what GATv2 alone has - rows of the graph beyond x_r (GATConv's phantom
row) are ignored. What every attention variant has (the kernels against the float64
reference, gradients, dropout, bad input) is in test_attention_ops.py."""
import pytest
import torch

from neptune_ext import Graph

from attention_variants import GATV2, grads
from conftest import _SEED, DEVICES
from graphs import cases

with torch.random.fork_rng():  # the graphs follow the run's seed too (replayable)
    torch.manual_seed(_SEED)
    CASES = cases()


@pytest.mark.parametrize("device", DEVICES)
def test_extra_graph_rows_are_ignored(device):
    """Rows of the graph beyond x_r (GATConv's phantom row) give no output and no gradient."""
    ei, n_src, n_dst = CASES["random"]
    g = Graph.from_edge_index(ei, (n_src, n_dst)).to(device)
    keep = n_dst - 4
    xl, xr, att, ef = ins = GATV2.inputs(n_src, keep, ei.shape[1], 2, 3, device=device)
    out = GATV2(ins, g, 0.2)
    assert out.shape == (keep, 2, 3)
    mask = ei[1].to(device) < keep
    sub = Graph.from_edge_index(ei[:, mask.cpu()], (n_src, keep)).to(device)
    ef_sub = ef.detach()[mask].requires_grad_()
    exp = GATV2.reference((xl, xr, att, ef_sub), sub, 0.2)
    torch.testing.assert_close(out, exp, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(out)
    g_out = grads(out, ins, go)
    g_exp = grads(exp, (xl, xr, att, ef_sub), go)
    for a, b in zip(g_out[:3], g_exp[:3]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(g_out[3][mask], g_exp[3], rtol=1e-10, atol=1e-11)
    assert torch.equal(g_out[3][~mask], torch.zeros_like(g_out[3][~mask]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", ["all", "fewer"])
def test_flat_heads_form(device, rows):
    """x_l/x_r as [N, H * C] (a Linear layer's output) with att [1, H, C]: the heads come from
    att, out takes x_r's form, and every number (output, gradients, attention weights) is the
    [N, H, C] form's, also with graph rows beyond x_r."""
    from neptune_ext.ops import gatv2_attention
    ei, n_src, n_dst = CASES["random"]
    g = Graph.from_edge_index(ei, (n_src, n_dst)).to(device)
    keep = n_dst if rows == "all" else n_dst - 3
    H, C = 3, 5
    xl, xr, att, ef = GATV2.inputs(n_src, keep, ei.shape[1], H, C, device=device)
    flat = [xl.detach().reshape(n_src, H * C).requires_grad_(), xr.detach().reshape(keep, H * C).requires_grad_(),
            att.detach().reshape(1, H, C).requires_grad_(), ef.detach().clone().requires_grad_()]
    want, alpha_want = gatv2_attention(xl, xr, att, g, 0.2, ef, return_attention=True)
    got, alpha_got = gatv2_attention(*flat[:3], g, 0.2, flat[3], return_attention=True)
    assert got.shape == (keep, H * C)
    torch.testing.assert_close(got, want.reshape(keep, H * C), rtol=0, atol=0)
    torch.testing.assert_close(alpha_got, alpha_want, rtol=0, atol=0)
    go = torch.randn_like(want)
    g_want = grads(want, (xl, xr, att, ef), go)
    g_got = grads(got, flat, go.reshape(keep, H * C))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b.reshape(a.shape), rtol=0, atol=0)
    if device == "cpu" and rows == "all":  # twice differentiable in this form too
        sg = Graph.from_edge_index(torch.randint(0, 6, (2, 15)), (6, 6))
        small = [torch.randn(6, H * C, dtype=torch.float64, requires_grad=True),
                 torch.randn(6, H * C, dtype=torch.float64, requires_grad=True),
                 torch.randn(1, H, C, dtype=torch.float64, requires_grad=True)]
        assert torch.autograd.gradgradcheck(lambda a, b, c: gatv2_attention(a, b, c, sg, 0.2), small)


def test_flat_heads_form_opcheck_and_errors():
    """The compiled op in the flat form: opcheck (schema, fake kernel, autograd), and a width
    that does not match att is a clear error on the Python and the direct path."""
    from neptune_ext.ops import gatv2_attention
    ei, n_src, n_dst = CASES["random"]
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    H, C = 2, 4
    xl = torch.randn(n_src, H * C, dtype=torch.float64, requires_grad=True)
    xr = torch.randn(n_dst, H * C, dtype=torch.float64, requires_grad=True)
    att = torch.randn(1, H, C, dtype=torch.float64, requires_grad=True)
    args = (xl, xr, att, g.rowptr, g.col, g.eid, *g.csc(), None, 0.2, 0.0, None)
    torch.library.opcheck(torch.ops.neptune.gatv2_forward.default, args)
    with pytest.raises(ValueError, match=r"x_l must have shape \[N_src, H \* C\]"):
        gatv2_attention(xl[:, :-1], xr, att, g)
    with pytest.raises(ValueError, match="x_r must have shape"):
        gatv2_attention(xl, xr.view(n_dst, H, C), att, g)
    with pytest.raises(RuntimeError, match="x_l must be"):
        torch.ops.neptune.gatv2_forward(xl[:, :-1].contiguous(), xr, att, *args[3:])


def test_bad_att_is_named():
    """An att that is neither [H, C] nor [1, H, C] is named as the bad argument, also when
    x_l is [N, H * C] (the heads come from att)."""
    from neptune_ext.ops import gatv2_attention
    g = Graph.from_edge_index(torch.tensor([[0, 1, 2], [1, 2, 1]]))
    x = torch.randn(3, 6)
    for att in (torch.randn(6), torch.randn(1, 1, 2, 3), torch.randn(2, 1, 3)):
        with pytest.raises(ValueError, match=r"att must have shape \[H, C\] or \[1, H, C\]"):
            gatv2_attention(x, x, att, g)


# ------------------------------------------------- infinite logits and the float range
def _inf_case(kind, dtype):
    """Edges 0-3 into row 4, 4-5 into row 5; an edge feature of -inf (att > 0) masks an edge's
    head, +inf makes it +inf, NaN makes it NaN."""
    g = torch.Generator().manual_seed(1)
    ei = torch.tensor([[0, 1, 2, 3, 0, 1], [4, 4, 4, 4, 5, 5]])
    xl = torch.randn(6, 2, 3, generator=g, dtype=torch.float64)
    xr = torch.randn(6, 2, 3, generator=g, dtype=torch.float64)
    att = torch.rand(2, 3, generator=g, dtype=torch.float64) + 0.1
    ef = torch.zeros(6, 2, 3, dtype=torch.float64)
    if kind == "masked_first":
        ef[0] = float("-inf")
    elif kind == "masked_last":
        ef[3] = float("-inf")
    elif kind == "all_masked":
        ef[4:] = float("-inf")
    elif kind == "plus_inf":
        ef[1, 0] = float("inf")
    elif kind == "nan":
        ef[2, 1, 0] = float("nan")
    return ei, [t.to(dtype) for t in (xl, xr, att, ef)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["masked_first", "masked_last", "all_masked", "plus_inf", "nan"])
def test_infinite_logits_kernel_and_reference_agree(kind, dtype):
    """The CPU forward's online softmax (every head at once, float32 by the kernels' own exp)
    follows torch's softmax on infinite and NaN logits, like the reference."""
    from neptune_ext.attention.reference import gatv2_attention_reference
    from neptune_ext.ops import gatv2_attention
    ei, (xl, xr, att, ef) = _inf_case(kind, dtype)
    got = gatv2_attention(xl, xr, att, Graph.from_edge_index(ei, 6), 0.2, ef)
    want = gatv2_attention_reference(*(t.double() for t in (xl, xr, att)), ei[0], ei[1], 6, 0.2, ef.double())
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, equal_nan=True)
    if kind in ("masked_first", "masked_last"):  # a mask equals dropping the edge
        keep = torch.isfinite(ef[:, 0, 0])
        torch.testing.assert_close(got, gatv2_attention(xl, xr, att, Graph.from_edge_index(ei[:, keep], 6),
                                                        0.2, ef[keep]), rtol=tol, atol=tol)
    if kind == "all_masked":
        assert torch.equal(got[5], torch.zeros_like(got[5])) and torch.isfinite(got).all()
    if kind == "plus_inf":
        assert torch.isnan(got[4, 0]).all() and torch.isfinite(got[4, 1]).all() and torch.isfinite(got[5]).all()
    if kind == "nan":
        assert torch.isnan(got[4, 1]).all() and torch.isfinite(got[4, 0]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logit_gaps_across_the_float_range(dtype):
    """Logit gaps of 0 to 150 within a row (weights from 1 down past float's smallest normal),
    the largest first in one head and last in the other (every online rescaling): output and
    gradients match the float64 reference at the dtype's precision."""
    from neptune_ext.attention.reference import gatv2_attention_reference
    from neptune_ext.ops import gatv2_attention
    deg, C = 40, 4
    gaps = torch.linspace(0, 150, deg, dtype=torch.float64)
    ei = torch.stack([torch.arange(deg), torch.zeros(deg, dtype=torch.long)])
    xl = torch.randn(deg, 2, C, dtype=torch.float64)
    xr = torch.zeros(1, 2, C, dtype=torch.float64)
    att = torch.full((2, C), 1.0 / C, dtype=torch.float64)
    # the edge feature sets each head's logit: -gap (every channel, so LeakyReLU's slope 0.2
    # applies: scaled by 5) minus x_l's own part, which leaves the logits exact
    ef = torch.stack([-5 * gaps, -5 * gaps.flip(0)], 1)[:, :, None].expand(deg, 2, C) - xl
    g = Graph.from_edge_index(ei, (deg, 1))
    leaves = [t.to(dtype).requires_grad_() for t in (xl, xr, att, ef)]
    got = gatv2_attention(*leaves[:3], g, 0.2, leaves[3])
    ref = [t.detach().double().requires_grad_() for t in leaves]
    want = gatv2_attention_reference(*ref[:3], ei[0], ei[1], 1, 0.2, ref[3])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    go = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, leaves, go.to(dtype)), torch.autograd.grad(want, ref, go)):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)
