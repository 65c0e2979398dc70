"""neptune_ext.Graph: CSR/CSC construction, self loops, devices, validation."""
import pytest
import torch

from neptune_ext import Graph

from graphs import cases


def naive_csr(ei, n_dst):
    rows = [[] for _ in range(n_dst)]
    for e, (s, d) in enumerate(ei.t().tolist()):
        rows[d].append((s, e))
    return rows


@pytest.mark.parametrize("name", list(cases()))
def test_csr_and_csc_match_naive(name):
    ei, n_src, n_dst = cases()[name]
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    assert g.num_edges == ei.shape[1] and g.num_src == n_src and g.num_dst == n_dst
    assert g.col.dtype == torch.int32
    rows = naive_csr(ei, n_dst)
    for i in range(n_dst):
        lo, hi = int(g.rowptr[i]), int(g.rowptr[i + 1])
        # Stable: within a destination, edges keep the caller's order.
        assert list(zip(g.col[lo:hi].tolist(), g.eid[lo:hi].tolist())) == rows[i]
    colptr, csc_row, csc_perm = g.csc()
    assert g.csc() is g.csc() and g.csc()[0] is colptr  # built once, cached
    for j in range(n_src):
        lo, hi = int(colptr[j]), int(colptr[j + 1])
        for t in range(lo, hi):
            k = int(csc_perm[t])
            assert int(g.col[k]) == j
            assert int(ei[1, g.eid[k]]) == int(csc_row[t])
    assert sorted(csc_perm.tolist()) == list(range(g.num_edges))


def test_size_inference_and_forms():
    ei = torch.tensor([[0, 3], [1, 2]])
    assert (Graph.from_edge_index(ei).num_src, Graph.from_edge_index(ei).num_dst) == (4, 4)
    assert Graph.from_edge_index(ei, 6).num_dst == 6
    g = Graph.from_edge_index(ei, (5, None))
    assert (g.num_src, g.num_dst) == (5, 4)
    assert Graph.from_edge_index(ei.int()).col.dtype == torch.int32


def test_add_self_loops_appends_in_caller_order():
    ei = torch.tensor([[0, 1, 2], [1, 1, 0]])
    g = Graph.from_edge_index(ei, (3, 2)).add_self_loops()
    assert g.num_edges == 5
    assert g.edge_index[:, 3:].tolist() == [[0, 1], [0, 1]]
    assert g.edge_index[:, :3].tolist() == ei.tolist()


def test_to_same_device_returns_the_graph_itself():
    g = Graph.from_edge_index(torch.tensor([[0, 1], [1, 0]]))
    g.csc()
    h = g.to("cpu")
    assert h is g
    assert "num_edges=2" in repr(g)


@pytest.mark.parametrize("bad,size,match", [
    (torch.tensor([[0.0, 1.0], [1.0, 0.0]]), None, "integer dtype"),
    (torch.tensor([0, 1, 2]), None, r"shape \[2, E\]"),
    (torch.zeros(3, 4, dtype=torch.long), None, r"shape \[2, E\]"),
    (torch.tensor([[0, -1], [1, 0]]), None, "negative node id"),
    (torch.tensor([[0, 5], [1, 0]]), (3, 3), r"edge_index\[0\] \(sources\) contains node id 5"),
    (torch.tensor([[0, 1], [1, 9]]), (3, 3), r"edge_index\[1\] \(destinations\) contains node id 9"),
    (torch.tensor([[0, 1], [1, 0]]), (2, -1), "num_dst must be a non-negative int"),
    (torch.tensor([[0, 1], [1, 0]]), "big", "size must be"),
    ([[0, 1], [1, 0]], None, "must be a torch.Tensor"),
    (torch.tensor([[True], [False]]), None, "integer dtype"),
])
def test_invalid_edge_index_raises(bad, size, match):
    with pytest.raises(ValueError, match=match):
        Graph.from_edge_index(bad, size)


def test_million_edge_graph_rowptr_matches_bincount():
    # A million edges still fit int32 indices; rowptr must count every destination.
    n, E = 100_000, 1_000_000
    ei = torch.randint(0, n, (2, E))
    g = Graph.from_edge_index(ei, n)
    assert int(g.rowptr[-1]) == E
    assert torch.equal(g.in_degree(), torch.bincount(ei[1], minlength=n))


@pytest.mark.parametrize("E,N", [(0, 5), (1, 1), (1000, 7), (300_000, 50_000), (200_000, 3)])
@pytest.mark.parametrize("itype", [torch.int32, torch.int64])
def test_csr_from_index_kernel_is_a_stable_sort(E, N, itype):
    import neptune_ext
    if neptune_ext._ext._C is None:
        pytest.skip("extension not built")
    idx = torch.randint(0, N, (E,))
    threads = torch.get_num_threads()
    outs = []
    for t in (threads, 1):
        torch.set_num_threads(t)
        try:
            outs.append(torch.ops.neptune.csr_from_index(idx.to(itype), N, itype))
        finally:
            torch.set_num_threads(threads)
    rowptr, perm = outs[0]
    assert torch.equal(rowptr, outs[1][0]) and torch.equal(perm, outs[1][1])
    assert rowptr.dtype == perm.dtype == itype
    assert torch.equal(perm.long(), torch.argsort(idx, stable=True))
    assert torch.equal(rowptr.long(), torch.searchsorted(idx.sort().values, torch.arange(N + 1)))
    torch.library.opcheck(torch.ops.neptune.csr_from_index.default, (idx, N, itype))


def test_csr_from_index_rejects_out_of_range():
    import neptune_ext
    if neptune_ext._ext._C is None:
        pytest.skip("extension not built")
    with pytest.raises(RuntimeError, match=r"index\[2\] = 9 is outside \[0, 4\)"):
        torch.ops.neptune.csr_from_index(torch.tensor([0, 1, 9]), 4, torch.int64)


def test_reference_graph_build_matches_kernel(monkeypatch):
    ei = torch.randint(0, 300, (2, 5000))
    g1 = Graph.from_edge_index(ei, 300)
    monkeypatch.setenv("NEPTUNE_FORCE_REFERENCE", "1")
    g2 = Graph.from_edge_index(ei, 300)
    for a, b in zip((g1.rowptr, g1.col, g1.eid) + g1.csc(), (g2.rowptr, g2.col, g2.eid) + g2.csc()):
        assert a.dtype == b.dtype and torch.equal(a, b)
