"""CUDA-specific checks of the fused graph-attention kernels.

tests/test_attention_ops.py already runs every semantic test on "cuda" too; this
file covers what only the CUDA kernels have: the hub split (leaf records and merge
levels), the thread layouts (vector widths, lane groups, tiles of wide H x C), the
scalar fallback for misaligned inputs, index types, streams, and the absence of
host synchronization. Everything here is skipped without a GPU.
"""
import pytest
import torch

import neptune_ext
from neptune_ext import Graph, ops

from graph_attention_checks import check_results
from graphs import power_law_graph, random_graph

pytestmark = pytest.mark.cuda

DEV = "cuda"


def _needs_ext():
    if neptune_ext._ext._C is None or "cuda" not in neptune_ext._ext.compiled_backends():
        pytest.skip("the CUDA kernels are not built")


@pytest.fixture(autouse=True)
def _require_cuda_kernels():
    _needs_ext()


def inputs(n_src, n_dst, E, H, C, dtype, edge_logits=True, scale=1.0):
    def r(*shape):
        return (torch.randn(*shape, dtype=torch.float64, device=DEV) * scale).to(dtype).requires_grad_()
    return r(n_src, H, C), r(n_src, H), r(n_dst, H), (r(E, H) if edge_logits else None)


def run_op(g, h, ss, sd, el, slope=0.2, p=0.0, seed=None, go=None):
    """Forward through ops.sparse_graph_attention, then backward with `go`."""
    out = ops.sparse_graph_attention(h, ss, sd, g, slope, el, p, p > 0, seed=seed)
    if go is None:
        go = torch.randn_like(out)
    ins = [t for t in (h, ss, sd, el) if t is not None]
    grads = torch.autograd.grad(out, ins, go)
    return out, list(grads), go


def check_against_reference(g, dtype, H, C, p=0.0, edge_logits=True, scale=1.0, grad_tol=None):
    """out vs the float64 reference, gradients vs the float64 backward (graph_attention_checks)."""
    h, ss, sd, el = inputs(g.num_src, g.num_dst, g.num_edges, H, C, dtype, edge_logits, scale)
    seed = torch.tensor(1234) if p > 0 else None
    out, grads, go = run_op(g, h, ss, sd, el, 0.2, p, seed)
    assert torch.isfinite(out).all()
    check_results(g, dtype, (h, ss, sd, el), out, grads, go, 0.2, p, seed, grad_tol)


def degree_graph(degrees, n_src=997, device=DEV):
    """Destination i receives degrees[i] edges from random sources (caller order shuffled)."""
    deg = torch.tensor(degrees, dtype=torch.int64)
    dst = torch.repeat_interleave(torch.arange(len(degrees)), deg)
    src = torch.randint(0, n_src, (dst.numel(),))
    perm = torch.randperm(dst.numel())
    ei = torch.stack([src[perm], dst[perm]]).to(device)
    return Graph.from_edge_index(ei, (n_src, len(degrees)))


# ---------------------------------------------------------------- hub split

def test_degrees_around_segment_boundaries():
    """Rows of degree L-1, L, L+1 around the leaf length (256 here) and the first
    merge level (256 * 32), mixed with empty and tiny rows, so rows start and end
    both on and off segment boundaries."""
    degrees = [0, 1, 255, 256, 257, 0, 3, 511, 512, 513, 8191, 8192, 8193, 0, 2, 20000, 1, 0]
    g = degree_graph(degrees)
    for dtype in (torch.float64, torch.float32):
        check_against_reference(g, dtype, H=3, C=8)
    check_against_reference(g, torch.float64, H=2, C=5, p=0.3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_hub_of_2m_in_edges_and_2m_out_edges(dtype):
    """One destination with 2M in-edges (split over ~8k groups and three merge
    levels) and one source with 1M out-edges (the backward source pass splits too)."""
    n = 5000
    E_in, E_out, E_rest = 2_000_000, 1_000_000, 20_000
    src = torch.cat([torch.randint(0, n, (E_in,)), torch.full((E_out,), 7), torch.randint(0, n, (E_rest,))])
    dst = torch.cat([torch.full((E_in,), 3), torch.randint(0, n, (E_out,)), torch.randint(0, n, (E_rest,))])
    perm = torch.randperm(src.numel())
    g = Graph.from_edge_index(torch.stack([src[perm], dst[perm]]).to(DEV), (n, n))
    # fp32: a sum over 1M edges carries ~1e-5 of rounding even when done well.
    check_against_reference(g, dtype, H=2, C=8, p=0.1 if dtype == torch.float64 else 0.0,
                            grad_tol=1e-4 if dtype == torch.float32 else None)


def test_power_law_matches_cpu_kernel():
    """The CUDA and CPU kernels agree (float64) on a graph with hubs both ways."""
    ei, n, _ = power_law_graph(20_000, 300_000)
    ei = torch.cat([ei, ei.flip(0)], 1)
    g_cpu = Graph.from_edge_index(ei, (n, n))
    g = g_cpu.to(DEV)
    H, C = 4, 16
    h, ss, sd, el = inputs(n, n, g.num_edges, H, C, torch.float64)
    seed = torch.tensor(77)
    out, grads, go = run_op(g, h, ss, sd, el, 0.15, 0.2, seed)
    cpu_in = [t.detach().cpu().requires_grad_() for t in (h, ss, sd, el)]
    out_c, grads_c, _ = run_op(g_cpu, *cpu_in, 0.15, 0.2, seed, go.cpu())
    torch.testing.assert_close(out.cpu(), out_c, rtol=1e-11, atol=1e-13)
    for a, b in zip(grads, grads_c):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- layouts

@pytest.mark.parametrize("H,C", [
    (1, 1), (1, 4), (3, 7), (8, 3), (2, 6),      # scalar path / tiny groups
    (4, 64), (4, 32), (16, 64),                  # vector path, one or several tiles
    (12, 96),                                    # H * C far beyond one warp slice
    (1, 600), (2, 1000),                         # several vectors per lane and head
    (5, 130),                                    # C a multiple of 2 only
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_shapes(H, C, dtype):
    ei, n_src, n_dst = random_graph(300, 200, 3000, DEV)
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    check_against_reference(g, dtype, H, C)


def test_misaligned_inputs_take_the_scalar_path():
    ei, n_src, n_dst = random_graph(100, 80, 900, DEV)
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    H, C = 2, 8
    h, ss, sd, el = inputs(n_src, n_dst, g.num_edges, H, C, torch.float32)
    flat = torch.empty(n_src * H * C + 1, device=DEV)
    h_odd = flat[1:].view(n_src, H, C)  # 4 bytes past a 16-byte boundary
    with torch.no_grad():
        h_odd.copy_(h)
    assert h_odd.data_ptr() % 16 != 0
    h_odd.requires_grad_()
    out_a, grads_a, go = run_op(g, h, ss, sd, el)
    out_b, grads_b, _ = run_op(g, h_odd, ss, sd, el, go=go)
    torch.testing.assert_close(out_b, out_a, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # Misaligned grad_out (the backward vectors fall back as well).
    go_flat = torch.empty(go.numel() + 1, device=DEV)
    go_odd = go_flat[1:].view_as(go)
    go_odd.copy_(go)
    _, grads_c, _ = run_op(g, h, ss, sd, el, go=go_odd)
    for a, c in zip(grads_a, grads_c):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- indices, streams, sync

def _raw_args(g, h, ss, sd, el, p=0.0, seed=None):
    return (h, ss, sd, g.rowptr, g.col, g.eid, *g.csc(), el, 0.2, p, seed)


def test_int32_and_int64_indices_are_bitwise_equal():
    ei, n, _ = power_law_graph(3000, 60_000, device=DEV)
    g32 = Graph.from_edge_index(ei, (n, n))
    assert g32.index_dtype == torch.int32
    g64 = Graph(g32.rowptr.long(), g32.col.long(), g32.eid.long(), g32.edge_index, n, n)
    g64._csc = tuple(t.long() for t in g32.csc())
    for dtype in (torch.float32, torch.bfloat16):
        h, ss, sd, el = (t.detach() for t in inputs(n, n, g32.num_edges, 4, 16, dtype))
        seed = torch.tensor(5)
        o32, l32 = torch.ops.neptune.gat_forward(*_raw_args(g32, h, ss, sd, el, 0.2, seed))
        o64, l64 = torch.ops.neptune.gat_forward(*_raw_args(g64, h, ss, sd, el, 0.2, seed))
        assert torch.equal(o32, o64) and torch.equal(l32, l64)
        go = torch.randn_like(o32)
        b32 = torch.ops.neptune.gat_backward(go, h, ss, sd, g32.rowptr, g32.col, g32.eid,
                                             *g32.csc(), el, o32, l32, 0.2, 0.2, seed)
        b64 = torch.ops.neptune.gat_backward(go, h, ss, sd, g64.rowptr, g64.col, g64.eid,
                                             *g64.csc(), el, o64, l64, 0.2, 0.2, seed)
        for a, b in zip(b32, b64):
            assert torch.equal(a, b)


def test_runs_on_the_current_stream():
    """On a side stream, the op must wait for the work queued before it: h is
    written there after a long sleep; an op on another stream would read zeros."""
    ei, n_src, n_dst = random_graph(500, 400, 5000, DEV)
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    g.csc()
    h_val, ss, sd, el = (t.detach() for t in inputs(n_src, n_dst, g.num_edges, 4, 16, torch.float32))
    expected = torch.ops.neptune.gat_forward(*_raw_args(g, h_val, ss, sd, el))[0]
    h = torch.zeros_like(h_val)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU cycles
        h.copy_(h_val)
        out = torch.ops.neptune.gat_forward(*_raw_args(g, h, ss, sd, el))[0]
    side.synchronize()
    assert torch.equal(out, expected)


def test_no_host_synchronization_cuda_graph_capture():
    """Forward and backward can be captured in a CUDA graph, which fails on any host
    synchronization, and the replay gives the eager results."""
    ei, n, _ = power_law_graph(4000, 80_000, device=DEV)
    g = Graph.from_edge_index(ei, (n, n))
    g.csc()
    h, ss, sd, el = (t.detach() for t in inputs(n, n, g.num_edges, 4, 16, torch.float32))
    go = torch.randn(n, 4, 16, device=DEV)
    seed = torch.tensor(9)

    def step():
        out, lse = torch.ops.neptune.gat_forward(*_raw_args(g, h, ss, sd, el, 0.1, seed))
        grads = torch.ops.neptune.gat_backward(go, h, ss, sd, g.rowptr, g.col, g.eid, *g.csc(),
                                               el, out, lse, 0.2, 0.1, seed)
        return (out, lse) + tuple(grads)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured):
        assert torch.equal(a, b)


def test_sync_debug_mode_reports_no_sync():
    ei, n_src, n_dst = random_graph(300, 200, 3000, DEV)
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    g.csc()
    h, ss, sd, el = (t.detach() for t in inputs(n_src, n_dst, g.num_edges, 2, 8, torch.float32))
    torch.cuda.synchronize()
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, lse = torch.ops.neptune.gat_forward(*_raw_args(g, h, ss, sd, el))
        torch.ops.neptune.gat_backward(torch.ones_like(out), h, ss, sd, g.rowptr, g.col, g.eid,
                                       *g.csc(), el, out, lse, 0.2, 0.0, None)
    finally:
        torch.cuda.set_sync_debug_mode(old)


# ---------------------------------------------------------------- degenerate sizes

def test_empty_graph_and_empty_sides():
    H, C = 3, 8
    # E = 0: every output row is 0, lse is 0, every gradient is 0.
    g = Graph.from_edge_index(torch.empty(2, 0, dtype=torch.int64, device=DEV), (6, 5))
    h, ss, sd, el = (t.detach() for t in inputs(6, 5, 0, H, C, torch.float32))
    out, lse = torch.ops.neptune.gat_forward(*_raw_args(g, h, ss, sd, el))
    assert out.shape == (5, H, C) and torch.equal(out, torch.zeros_like(out))
    assert lse.shape == (5, H) and torch.equal(lse, torch.zeros_like(lse))
    gh, gss, gsd, gel = torch.ops.neptune.gat_backward(torch.randn_like(out), h, ss, sd, g.rowptr,
                                                       g.col, g.eid, *g.csc(), el, out, lse, 0.2,
                                                       0.0, None)
    for t in (gh, gss, gsd):
        assert torch.equal(t, torch.zeros_like(t))
    assert gel.shape == (0, H)
    # N_dst = 0 and N_src = 0.
    for n_src, n_dst in ((4, 0), (0, 4), (0, 0)):
        g = Graph.from_edge_index(torch.empty(2, 0, dtype=torch.int64, device=DEV), (n_src, n_dst))
        h, ss, sd, _ = inputs(n_src, n_dst, 0, H, C, torch.float32, edge_logits=False)
        out, grads, _ = run_op(g, h, ss, sd, None)
        assert out.shape == (n_dst, H, C)
        assert [t.shape for t in grads] == [h.shape, ss.shape, sd.shape]
        assert all(torch.equal(t, torch.zeros_like(t)) for t in grads)


def test_lse_matches_logsumexp():
    ei, n_src, n_dst = random_graph(50, 40, 400, DEV)
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    h, ss, sd, el = (t.detach() for t in inputs(n_src, n_dst, g.num_edges, 2, 4, torch.float64))
    _, lse = torch.ops.neptune.gat_forward(*_raw_args(g, h, ss, sd, el, 0.0, None))
    src, dst = ei
    raw = torch.nn.functional.leaky_relu(ss[src] + sd[dst] + el, 0.2)
    m = torch.full((n_dst, 2), float("-inf"), dtype=torch.float64, device=DEV)
    m = m.scatter_reduce(0, dst[:, None].expand(-1, 2), raw, "amax")
    s = torch.zeros_like(m).index_add(0, dst, torch.exp(raw - m[dst]))
    has = s > 0
    exp = torch.where(has, m + torch.log(s.clamp_min(1e-300)), torch.zeros_like(m))
    torch.testing.assert_close(lse, exp, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- determinism

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bitwise_deterministic_with_hubs(dtype):
    ei, n, _ = power_law_graph(20_000, 400_000, alpha=1.5, device=DEV)
    ei = torch.cat([ei, ei.flip(0)], 1)  # hubs as destinations and as sources
    g = Graph.from_edge_index(ei, (n, n))
    h, ss, sd, el = inputs(n, n, g.num_edges, 4, 64, dtype)
    go = torch.randn(n, 4, 64, device=DEV, dtype=dtype)
    seed = torch.tensor(21)
    runs = []
    for _ in range(3):
        out, grads, _ = run_op(g, h, ss, sd, el, 0.2, 0.1, seed, go)
        runs.append([out] + grads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_bad_device_is_an_error():
    g = Graph.from_edge_index(torch.tensor([[0, 1], [1, 0]], device=DEV), (2, 2))
    h, ss, sd, _ = inputs(2, 2, 2, 1, 4, torch.float32, edge_logits=False)  # no edge logits: None
    h, ss, sd = h.detach(), ss.detach(), sd.detach()
    with pytest.raises(RuntimeError, match="must be on"):
        torch.ops.neptune.gat_forward(h, ss.cpu(), sd, g.rowptr, g.col, g.eid, *g.csc(), None,
                                      0.2, 0.0, None)
