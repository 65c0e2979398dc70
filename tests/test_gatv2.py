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
