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
