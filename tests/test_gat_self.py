"""neptune::gat_att (the GraphAttention layer's one-op step: logit halves from the attention
vectors, GATConv's phantom row of removed self loops dropped inside) against the float64
reference, on the graphs the layer builds."""
import pytest
import torch

import neptune_ext
from neptune_ext.attention.self_loops import GATGraph
from neptune_ext.attention.gat import gat_self_attention
from neptune_ext.attention.reference import sparse_graph_attention_reference

from conftest import DEVICES
from graphs import hub_graph, random_graph

pytestmark = pytest.mark.skipif(neptune_ext._ext._C is None, reason="extension not built")


def graphs(device):
    """name -> (edge_index, n): same-node graphs, with loops in the input."""
    ei, n, _ = random_graph(23, 23, 150, device)
    ei = torch.cat([ei, torch.tensor([[0, 3, 3], [0, 3, 3]], device=device)], 1)  # loops, a duplicate
    half, _, _ = random_graph(12, 12, 30, device)
    return {"random": (ei, n), "isolated": (torch.cat([half, torch.tensor([[13], [13]], device=device)], 1), 20),
            "empty": (torch.empty(2, 0, dtype=torch.int64, device=device), 6)}


def reference(h, a_s, a_d, prepared, slope, el, p, seed):
    g = prepared.graph
    rows, n = g.num_dst, h.shape[0]
    sd = (h * a_d).sum(-1)
    sd = torch.cat([sd, sd.new_zeros(rows - n, h.shape[1])])
    out = sparse_graph_attention_reference(h, (h * a_s).sum(-1), sd, g.edge_index[0], g.edge_index[1],
                                           rows, slope, el, p, None if seed is None else int(seed))
    return out[:n]


def inputs(n, E, H, C, device, edges=True):
    r = lambda *s: torch.randn(*s, dtype=torch.float64, device=device).requires_grad_()  # noqa: E731
    return r(n, H, C), r(H, C), r(H, C), (r(E, H) if edges else None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["random", "isolated", "empty"])
@pytest.mark.parametrize("loops", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_against_reference(name, loops, dropout, device):
    ei, n = graphs(device)[name]
    prepared = GATGraph.from_edge_index(ei, n, n, loops)
    g = prepared.graph
    assert g.num_dst == n + loops
    h, a_s, a_d, el = inputs(n, g.num_edges, 3, 5, device)
    seed = torch.tensor(1234) if dropout else None
    out = gat_self_attention(h, a_s, a_d, g, 0.2, el, dropout, True, seed=seed)
    want = reference(h, a_s, a_d, prepared, 0.2, el, dropout, seed)
    torch.testing.assert_close(out, want)
    go = torch.randn_like(out)
    got = torch.autograd.grad(out, (h, a_s, a_d, el), go, allow_unused=True)
    exp = torch.autograd.grad(want, (h, a_s, a_d, el), go, allow_unused=True)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a if a is not None else torch.zeros_like(b),
                                   b if b is not None else torch.zeros_like(a))


@pytest.mark.parametrize("device", DEVICES)
def test_hub(device):
    ei, n, _ = hub_graph(100_000, device=device)
    prepared = GATGraph.from_edge_index(ei, n, n, True)
    h, a_s, a_d, el = inputs(n, prepared.graph.num_edges, 2, 4, device)
    out = gat_self_attention(h, a_s, a_d, prepared.graph, 0.2, el, 0.0, True)
    torch.testing.assert_close(out, reference(h, a_s, a_d, prepared, 0.2, el, 0.0, None))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_and_double_backward(device):
    ei, n = graphs(device)["random"]
    g = GATGraph.from_edge_index(ei[:, :40], n, n, True).graph
    h, a_s, a_d, el = inputs(n, g.num_edges, 2, 3, device)
    f = lambda h, a_s, a_d, el: gat_self_attention(h, a_s, a_d, g, 0.2, el, 0.0, True)  # noqa: E731
    assert torch.autograd.gradcheck(f, (h, a_s, a_d, el))
    assert torch.autograd.gradgradcheck(f, (h, a_s, a_d, el))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_dropout", [False, True])
def test_opcheck(with_dropout, device):
    ei, n = graphs(device)["random"]
    g = GATGraph.from_edge_index(ei, n, n, True).graph
    h, a_s, a_d, el = inputs(n, g.num_edges, 2, 5, device)
    p, seed = (0.3, torch.tensor(11)) if with_dropout else (0.0, None)
    args = (h, a_s, a_d, g.rowptr, g.col, g.eid, *g.csc(), el, 0.2, p, seed)
    torch.library.opcheck(torch.ops.neptune.gat_att_forward.default, args)
    out, lse = torch.ops.neptune.gat_att_forward(*args)
    assert out.shape == h.shape and lse.shape == (n + 1, 2)
    bargs = (torch.randn_like(out), h.detach(), a_s.detach(), a_d.detach(), g.rowptr, g.col, g.eid,
             *g.csc(), el.detach(), out.detach(), lse, 0.2, p, seed)
    torch.library.opcheck(torch.ops.neptune.gat_att_backward.default, bargs)


def test_bad_shapes_are_clear_errors():
    ei, n = graphs("cpu")["random"]
    g = GATGraph.from_edge_index(ei, n, n, True).graph
    h, a_s, a_d, el = inputs(n, g.num_edges, 2, 5, "cpu")
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="att_src and att_dst must be"):
            torch.ops.neptune.gat_att_forward(h, a_s[:1], a_d, g.rowptr, g.col, g.eid, *g.csc(), el, 0.2, 0.0, None)
        with pytest.raises(RuntimeError, match="rowptr must have at least"):
            torch.ops.neptune.gat_att_forward(torch.randn(n + 5, 2, 5, dtype=torch.float64), a_s, a_d,
                                              g.rowptr, g.col, g.eid, *g.csc(), el, 0.2, 0.0, None)


@pytest.mark.parametrize("device", DEVICES)
def test_large_inputs(device):
    # h above 2**16 elements: the ATen composition instead of the small-input loops
    ei, n, _ = random_graph(3000, 3000, 20_000, device)
    prepared = GATGraph.from_edge_index(ei, n, n, True)
    h, a_s, a_d, el = inputs(n, prepared.graph.num_edges, 4, 8, device)
    assert h.numel() > 2**16
    out = gat_self_attention(h, a_s, a_d, prepared.graph, 0.2, el, 0.0, True)
    want = reference(h, a_s, a_d, prepared, 0.2, el, 0.0, None)
    torch.testing.assert_close(out, want)
    go = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (h, a_s, a_d, el), go),
                    torch.autograd.grad(want, (h, a_s, a_d, el), go)):
        torch.testing.assert_close(a, b)


def test_cpu_gat_backward_takes_fewer_rows_than_the_graph():
    # What gat_att's backward relies on: on the CPU, grad_out and out with N rows for a graph
    # with N + 1 (the phantom row) give the gradients of zero-padded ones, and no more rows
    # than the graph is an error.
    ei, n = graphs("cpu")["random"]
    g = GATGraph.from_edge_index(ei, n, n, True).graph
    h = torch.randn(n, 2, 3, dtype=torch.float64)
    ss, sd, el = torch.randn(n, 2, dtype=torch.float64), torch.randn(n + 1, 2, dtype=torch.float64), \
        torch.randn(g.num_edges, 2, dtype=torch.float64)
    common = (g.rowptr, g.col, g.eid, *g.csc(), el)
    out, lse = torch.ops.neptune.gat_forward(h, ss, sd, *common, 0.2, 0.0, None)
    go = torch.randn(n, 2, 3, dtype=torch.float64)
    padded = torch.cat([go, go.new_zeros(1, 2, 3)])
    want = torch.ops.neptune.gat_backward(padded, h, ss, sd, *common, out, lse, 0.2, 0.0, None)
    got = torch.ops.neptune.gat_backward(go, h, ss, sd, *common, out[:n], lse, 0.2, 0.0, None)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="or fewer rows"):
        torch.ops.neptune.gat_backward(torch.cat([padded, padded[:1]]), h, ss, sd, *common,
                                       torch.cat([out, out[:1]]), lse, 0.2, 0.0, None)
