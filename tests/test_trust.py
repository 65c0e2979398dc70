"""No silent wrong answer, no crash: bad graphs on every path, caches, infinite logits,
and GATConv behaviours beyond the numerical comparisons of test_gat_layer.py."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import neptune_ext
from neptune_ext import Graph
from neptune_ext.nn import GraphAttention, Stage
from neptune_ext.reference import sparse_graph_attention_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_kernels = pytest.mark.skipif(not neptune_ext._ext.use_kernels("cpu"),
                                   reason="needs the compiled CPU kernels")


def run_python(code: str, timeout=600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=timeout)


# --------------------------------------------------------------------- bad graphs
BAD_GRAPH_CASES = r'''
import torch, neptune_ext
from neptune_ext import Graph, ops
from neptune_ext.nn import GraphAttention

ei = torch.tensor([[0, 1, 2, 3, 4], [1, 2, 3, 4, 0]])
h, s = torch.randn(5, 2, 4), torch.randn(5, 2)

def case(name, fn):
    print("CASE", name, flush=True)
    try:
        fn()
    except ValueError as e:
        print("RESULT", name, "ValueError", str(e).splitlines()[0], flush=True)
    except Exception as e:
        print("RESULT", name, "OTHER", type(e).__name__, str(e).splitlines()[0][:200], flush=True)
    else:
        print("RESULT", name, "NOERROR", flush=True)

def mutated(value):
    g = Graph.from_edge_index(ei, 5)
    g.col[0] = value
    return g

def built(col):
    g = Graph.from_edge_index(ei, 5)
    return Graph(g.rowptr, col, g.eid, g.edge_index, 5, 5)

empty = torch.empty(0, dtype=torch.int32)
def direct(rowptr=None, col=None, eid=None):
    g = Graph.from_edge_index(ei, 5)
    return torch.ops.neptune.gat_forward(h, s, s, g.rowptr if rowptr is None else rowptr,
        g.col if col is None else col, g.eid if eid is None else eid, empty, empty, empty,
        None, 0.2, 0.0, None)

def direct_backward(perm):
    g = Graph.from_edge_index(ei, 5)
    cp, cr, cperm = g.csc()
    out, lse = ops.sparse_graph_attention(h, s, s, g), torch.zeros(5, 2)
    return torch.ops.neptune.gat_backward(torch.randn(5, 2, 4), h, s, s, g.rowptr, g.col, g.eid,
        cp, cr, perm(cperm), None, out, lse, 0.2, 0.0, None)

case("validate_false", lambda: ops.sparse_graph_attention(
    h, s, s, Graph.from_edge_index(torch.tensor([[0, 10**9], [1, 0]]), 5, validate=False)))
case("validate_false_small", lambda: Graph.from_edge_index(torch.tensor([[0, 7], [1, 0]]), 5, validate=False))
case("mutated_huge", lambda: ops.sparse_graph_attention(h, s, s, mutated(2**30)))
case("mutated_small", lambda: ops.sparse_graph_attention(h, s, s, mutated(7)))
case("mutated_negative", lambda: ops.sparse_graph_attention(h, s, s, mutated(-1)))
case("constructor", lambda: ops.sparse_graph_attention(h, s, s, built(torch.full((5,), 9, dtype=torch.int32))))
case("layer_graph_input", lambda: GraphAttention(4, 4, heads=2)(torch.randn(5, 4), mutated(7)))
case("direct_col", lambda: direct(col=torch.tensor([0, 1, 2, 3, 10**9], dtype=torch.int32)))
case("direct_eid", lambda: direct(eid=torch.tensor([0, 1, 2, 3, 10**9], dtype=torch.int32)))
case("direct_eid_dup", lambda: direct(eid=torch.tensor([0, 1, 2, 3, 3], dtype=torch.int32)))
case("direct_rowptr", lambda: direct(rowptr=torch.tensor([0, 3, 2, 5, 5, 10**6], dtype=torch.int32)))
case("direct_backward_perm", lambda: direct_backward(lambda p: p.flip(0)))
case("direct_backward_oob", lambda: direct_backward(lambda p: torch.full_like(p, 10**6)))
case("huge_2_31", lambda: Graph.from_edge_index(torch.tensor([[0, 2**31], [1, 0]])))
case("huge_2_40", lambda: Graph.from_edge_index(torch.tensor([[0, 2**40], [1, 0]])))
case("huge_2_63", lambda: Graph.from_edge_index(torch.tensor([[0, 2**63 - 1], [1, 0]])))
conv = GraphAttention(4, 4, heads=2)
compiled = torch.compile(conv)
case("compile_small", lambda: compiled(torch.randn(5, 4), torch.tensor([[0, 7], [1, 0]]), size=(5, 5)))
case("compile_huge", lambda: compiled(torch.randn(5, 4), torch.tensor([[0, 10**9], [1, 0]]), size=(5, 5)))
print("DONE", flush=True)
'''


@needs_kernels
def test_a_bad_graph_never_reaches_a_kernel_on_any_path():
    """Each path in one interpreter: a crash would show as the case it died in."""
    proc = run_python(BAD_GRAPH_CASES)
    assert proc.returncode == 0 and "DONE" in proc.stdout, (proc.stdout[-2000:], proc.stderr[-3000:])
    results = {line.split()[1]: line for line in proc.stdout.splitlines() if line.startswith("RESULT")}
    assert len(results) == 18, proc.stdout
    for name, line in results.items():
        assert " ValueError " in line, line
    assert "edge_index" in results["compile_small"] and "7" in results["compile_small"]
    assert "edge_index" in results["compile_huge"]
    for name in ("huge_2_31", "huge_2_40", "huge_2_63"):
        assert "edge_index" in results[name] and "size" in results[name]
    assert "col" in results["mutated_huge"] and "eid" in results["direct_eid_dup"]
    assert "transpose" in results["direct_backward_perm"]


@needs_kernels
def test_a_valid_hand_built_graph_is_accepted_and_equal():
    ei = torch.randint(0, 30, (2, 200))
    g = Graph.from_edge_index(ei, 30)
    hand = Graph(g.rowptr.clone(), g.col.clone(), g.eid.clone(), g.edge_index, 30, 30)
    h, s = torch.randn(30, 2, 5, dtype=torch.float64), torch.randn(30, 2, dtype=torch.float64)
    want = neptune_ext.ops.sparse_graph_attention(h, s, s, g)
    torch.testing.assert_close(neptune_ext.ops.sparse_graph_attention(h, s, s, hand), want, rtol=0, atol=0)
    # Modified in place: checked again (rejected); restored: checked again, accepted.
    first = int(hand.col[0])
    hand.col[0] = 99
    with pytest.raises(ValueError, match="col"):
        neptune_ext.ops.sparse_graph_attention(h, s, s, hand)
    hand.col[0] = first
    torch.testing.assert_close(neptune_ext.ops.sparse_graph_attention(h, s, s, hand), want, rtol=0, atol=0)


def test_graph_index_tensors_cannot_be_swapped():
    g = Graph.from_edge_index(torch.tensor([[0, 1], [1, 0]]), 2)
    with pytest.raises(AttributeError):
        g.col = torch.zeros(2, dtype=g.index_dtype)


@pytest.mark.parametrize("size", [np.int64(3), (np.int32(3), np.int64(3)), torch.tensor(3)])
def test_size_accepts_integer_likes(size):
    g = Graph.from_edge_index(torch.tensor([[0, 1], [1, 2]]), size)
    assert (g.num_src, g.num_dst) == (3, 3)


# -------------------------------------------------------------------------- caches
def test_fresh_int32_edge_index_at_a_reused_address_is_never_served_stale():
    torch.manual_seed(0)
    conv = GraphAttention(6, 4, heads=2)
    fresh = GraphAttention(6, 4, heads=2)
    fresh.load_state_dict(conv.state_dict())
    fresh.cache_graph = False
    x = torch.randn(50, 6)
    for step in range(60):
        ei = torch.randint(0, 50, (2, 300), dtype=torch.int32)  # freed each step: addresses recur
        torch.testing.assert_close(conv(x, ei), fresh(x, ei), rtol=0, atol=0, msg=f"step {step}")
        del ei


def test_views_with_the_same_address_and_other_strides_do_not_collide():
    conv = GraphAttention(6, 4, heads=2)
    x = torch.randn(50, 6)
    base = torch.randint(0, 50, (2, 80))
    a, b = base[:, :40], base[:, ::2]
    assert a.data_ptr() == b.data_ptr()
    out_a, out_b = conv(x, a), conv(x, b)
    conv.clear_graph_cache()
    torch.testing.assert_close(out_b, conv(x, b.clone()), rtol=0, atol=0)
    torch.testing.assert_close(out_a, conv(x, a.clone()), rtol=0, atol=0)


def test_in_place_edit_of_edge_index_rebuilds_the_graph():
    conv = GraphAttention(6, 4, heads=2)
    x, ei = torch.randn(20, 6), torch.randint(0, 20, (2, 60))
    conv(x, ei)
    ei[0, :30] = (ei[0, :30] + 3) % 20
    want = GraphAttention(6, 4, heads=2)
    want.load_state_dict(conv.state_dict())
    torch.testing.assert_close(conv(x, ei), want(x, ei.clone()), rtol=0, atol=0)


def _stage_pair():
    torch.manual_seed(0)
    stage = Stage(3, 4, 3, padding=1).double().eval()
    with torch.no_grad():
        stage.bn.running_mean.normal_()
        stage.bn.running_var.uniform_(0.5, 2)
    return stage


def test_stage_fold_cache_follows_in_place_writes_and_can_be_cleared_or_disabled():
    stage = _stage_pair()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)

    def eager():
        return torch.relu(stage.bn(stage.conv(x)))

    with torch.no_grad():
        stage(x)
        stage.conv.weight.mul_(2)                 # seen by the version counter
        torch.testing.assert_close(stage(x), eager(), rtol=1e-12, atol=1e-12)
        stage.load_state_dict({k: v * 1.5 if v.is_floating_point() else v
                               for k, v in stage.state_dict().items()})
        torch.testing.assert_close(stage(x), eager(), rtol=1e-12, atol=1e-12)
        stage.conv.weight.data.mul_(2)            # not seen (documented): clear_cache()
        stage.clear_cache()
        torch.testing.assert_close(stage(x), eager(), rtol=1e-12, atol=1e-12)
        stage.cache_fold = False                  # or no cache at all
        stage.conv.weight.data.mul_(0.5)
        torch.testing.assert_close(stage(x), eager(), rtol=1e-12, atol=1e-12)


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
    got = neptune_ext.ops.sparse_graph_attention(h, s, s, g, edge_logits=el)
    want = sparse_graph_attention_reference(h, s, s, ei[0], ei[1], 6, 0.2, el)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)
    if kind in ("masked_first", "masked_last"):
        # A mask equals dropping the edge.
        keep = torch.isfinite(el[:, 0])
        g2 = Graph.from_edge_index(ei[:, keep], 6)
        torch.testing.assert_close(got, neptune_ext.ops.sparse_graph_attention(h, s, s, g2,
                                   edge_logits=el[keep]), rtol=1e-12, atol=1e-12)
        hr = h.clone().requires_grad_()
        neptune_ext.ops.sparse_graph_attention(hr, s, s, g, edge_logits=el).sum().backward()
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
        GraphAttention(4, 4, negative_slope=slope)
    g = Graph.from_edge_index(torch.tensor([[0, 1], [1, 0]]), 2)
    h, s = torch.randn(2, 1, 3), torch.randn(2, 1)
    with pytest.raises(ValueError, match="negative_slope"):
        neptune_ext.ops.sparse_graph_attention(h, s, s, g, negative_slope=slope)


# ------------------------------------------------------------ GATConv behaviours
pyg_nn = pytest.importorskip("torch_geometric.nn")


def test_bipartite_without_destination_features_matches_gatconv():
    torch.manual_seed(0)
    ours = GraphAttention((8, 16), 4, heads=2).double()
    theirs = pyg_nn.GATConv((8, 16), 4, heads=2).double()
    theirs.load_state_dict(ours.state_dict())
    x_src = torch.randn(4, 8, dtype=torch.float64)
    ei = torch.tensor([[0, 1, 2, 3, 1], [0, 0, 1, 1, 1]])
    out_o = ours((x_src, None), ei, size=(4, 2))
    out_t = theirs((x_src, None), ei, size=(4, 2))
    torch.testing.assert_close(out_o, out_t, rtol=1e-10, atol=1e-12)
    out_o.sum().backward(), out_t.sum().backward()
    for name, p in theirs.named_parameters():
        mine = dict(ours.named_parameters())[name].grad
        if p.grad is None:
            assert mine is None, name
        else:
            torch.testing.assert_close(mine, p.grad, rtol=1e-9, atol=1e-11)
    assert ours.att_dst.grad is None and ours.lin_dst.weight.grad is None


@pytest.mark.parametrize("in_channels", [-1, (-1, -1)])
def test_lazy_in_channels_like_gatconv(in_channels):
    torch.manual_seed(0)
    ours = GraphAttention(in_channels, 4, heads=2, residual=True).double()
    theirs = pyg_nn.GATConv(in_channels, 4, heads=2, residual=True).double()
    x = torch.randn(10, 7, dtype=torch.float64)
    ei = torch.randint(0, 10, (2, 30))
    ours(x, ei), theirs(x, ei)  # both sized by the first call
    assert set(ours.state_dict()) == set(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x, ei), theirs(x, ei), rtol=1e-10, atol=1e-12)
    assert ours.state_dict()["lin.weight" if in_channels == -1 else "lin_src.weight"].shape == (8, 7)


def test_three_dimensional_x_dst_is_reported_as_x():
    conv = GraphAttention((4, 4), 4)
    with pytest.raises(ValueError, match=r"x_dst"):
        conv((torch.randn(5, 4), torch.randn(5, 4, 1)), torch.tensor([[0, 1], [1, 0]]))
