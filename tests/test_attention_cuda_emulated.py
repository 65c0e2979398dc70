"""The CUDA attention kernels of every variant (GAT, GATv2, graph transformer), run on the
CPU by tests/cuda_emulation: each warp's 32 lanes run as fibers, shuffles are real
rendezvous, outputs and scratch start as NaN so anything left unwritten shows. float64
against the float64 reference (output and every gradient through autograd); every dtype
against the CPU kernel fed the same rounded inputs; GAT's also against its own float64
oracles (tests/graph_attention_checks.py). Every lane layout, edge inputs on and off,
dropout, both index types, empty graphs, isolated nodes and a hub, on every machine, GPU or
not. What one variant alone has stays in its own file (test_graph_attention_cuda_emulated.py:
GAT's hub-splitting record tree; test_gatv2_cuda_emulated.py: ignored rows;
test_transformer_cuda_emulated.py: exact dropout masks, infinite logits). Races between warps,
timing and the real memory system are left to a GPU."""
import pytest
import torch

from neptune_ext import Graph

import emulated_attention as emulated
from attention_variants import GAT, GATV2, TRANSFORMER, as_int64, with_index
from attention_variants import CUDA_VARIANTS as VARIANTS, cuda_variants as variants
from emulated_attention import MAX_HC, check, inputs, run
from graphs import cases, hub_graph, power_law_graph, random_graph

pytestmark = pytest.mark.slow

# GAT runs on two builds: the real constants, and "deep" (leaf segments of 4 edges, fan-in 2),
# in which small graphs already need many levels of its hub-splitting records. The other
# variants have no such constants: one build.
KINDS = {GAT: ("default", "deep"), GATV2: ("default",), TRANSFORMER: ("default",)}


def variant_kinds(extra=None):
    """(variant, kind[, x for x in extra[variant]]) parameters."""
    out = []
    for v in VARIANTS:
        for kind in KINDS[v]:
            if extra is None:
                out.append(pytest.param(v, kind, id=f"{v}-{kind}"))
            else:
                out += [pytest.param(v, kind, *x, id=f"{v}-{kind}-" + "-".join(map(str, x))) for x in extra[v]]
    return out


@pytest.fixture(scope="module")
def builds():
    loaded = {}

    def get(kind="default"):
        if kind not in loaded:
            loaded[kind] = emulated.load(kind)
        return loaded[kind]
    return get


# ---------------------------------------------------------------- semantics

@pytest.mark.parametrize("variant,kind", variant_kinds())
@pytest.mark.parametrize("name", list(cases()))
@pytest.mark.parametrize("index", ["int32", "int64"])
def test_cases(builds, variant, kind, name, index):
    emu = builds(kind)
    ei, n_src, n_dst = cases()[name]
    g = with_index(Graph.from_edge_index(ei, (n_src, n_dst)), index)
    check(emu, variant, g, 3, 7, torch.float64)                        # scalar path
    check(emu, variant, g, 3, 5, torch.float64)
    check(emu, variant, g, 2, 4, torch.float64, edge=False)            # fp64 uses scalars too
    check(emu, variant, g, 2, 4, torch.float64, edge=False, p=0.3)
    check(emu, variant, g, 2, 8, torch.float64, edge=False, p=0.3)
    if variant is GAT:  # 16-byte vectors, dropout. (Only against oracles that judge the
        # logit gradients of a one-edge row, cancellation noise below float64, on their terms:
        # GAT's check_results; the CPU kernel's noise is no oracle for the other variants'.)
        check(emu, variant, g, 2, 8, torch.float32, p=0.3)


_F = [torch.float64, torch.float32, torch.bfloat16]
LAYOUTS = {
    GAT: [(H, C, d) for H, C in [(1, 1), (3, 7), (8, 3), (4, 64), (4, 32), (16, 64), (12, 96), (1, 600),
                                 (2, 1000), (5, 130), (2, 0)] for d in _F + [torch.float16]],
    GATV2: [(H, C, d) for H, C in [(1, 1), (3, 5), (2, 4), (8, 4), (4, 32), (2, 64), (5, 40), (1, 1024),
                                   (3, 96)] for d in _F],
    # 1 to 32 features per lane; C = 1, 3, 8, 32, 33, 64: powers of two below, at and above
    # 32, and not; H * C up to the limit
    TRANSFORMER: [(H, C, d) for H, C in [(1, 1), (4, 1), (3, 3), (11, 3), (4, 8), (2, 32), (1, 33), (3, 33),
                                         (2, 64), (3, 64), (16, 64), (1, 1024), (31, 33)] for d in _F],
}


@pytest.mark.parametrize("variant,kind,H,C,dtype", variant_kinds(LAYOUTS))
def test_layouts(builds, variant, kind, H, C, dtype):
    ei, n_src, n_dst = random_graph(25, 20, 120)
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    check(builds(kind), variant, g, H, C, dtype)


@variants
@pytest.mark.parametrize("H,C", [(2, 3), (4, 8), (2, 33), (3, 64)])
@pytest.mark.parametrize("edge", [True, False])
def test_float16(builds, variant, H, C, edge):
    ei, n_src, n_dst = random_graph(25, 20, 120)
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    check(builds(), variant, g, H, C, torch.float16, edge=edge)


@variants
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("index", ["int32", "int64"])
def test_dropout(builds, variant, dtype, index):
    ei, n_src, n_dst = random_graph(30, 24, 200)
    g = with_index(Graph.from_edge_index(ei, (n_src, n_dst)), index)
    check(builds(), variant, g, 3, 8, dtype, p=0.4)
    check(builds(), variant, g, 2, 33, dtype, edge=False, p=0.2)


@pytest.mark.parametrize("variant,kind", variant_kinds())
def test_dropout_mask_matches_reference(builds, variant, kind):
    ei, n_src, n_dst = random_graph(30, 20, 300)
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    for p in (0.1, 0.5, 0.9):
        check(builds(kind), variant, g, 3, 8, torch.float64, p=p, param=0.05)


@variants
@pytest.mark.parametrize("index", ["int32", "int64"])
def test_hub(builds, variant, index):
    ei, n_src, n_dst = hub_graph(3000, 200)
    g = with_index(Graph.from_edge_index(ei, (n_src, n_dst)), index)
    check(builds(), variant, g, 2, 4, torch.float64)
    check(builds(), variant, g, 2, 4, torch.float32, p=0.1)


@variants
def test_isolated_sources_and_destinations(builds, variant):
    """Sources 10..19 feed nobody (zero gradient for their rows); destinations 8..15 receive
    nothing (out 0, lse 0, zero gradient for their rows)."""
    emu = builds()
    ei = torch.stack([torch.randint(0, 10, (40,)), torch.randint(0, 8, (40,))])
    g = Graph.from_edge_index(ei, (20, 16))
    check(emu, variant, g, 2, 3, torch.float64)
    ins = inputs(variant, g, 2, 3, torch.float32)
    out, lse, grads, _ = run(emu, variant, g, ins, torch.randn(16, 2, 3), 0.7)
    assert (out[8:] == 0).all() and (lse[8:] == 0).all()
    for i in variant.dst_inputs:
        assert (grads[i][8:] == 0).all(), variant.arg_names[i]
    for i in variant.src_inputs:
        assert (grads[i][10:] == 0).all(), variant.arg_names[i]


@variants
def test_empty_sizes(builds, variant):
    H, C = 3, 8
    for n_src, n_dst in ((6, 5), (4, 0), (0, 4), (0, 0)):
        g = Graph.from_edge_index(torch.empty(2, 0, dtype=torch.int64), (n_src, n_dst))
        ins = inputs(variant, g, H, C, torch.float32)
        out, lse, grads, _ = run(builds(), variant, g, ins, None, 0.2)
        assert out.shape == (n_dst, H, C) and torch.equal(out, torch.zeros_like(out))
        assert torch.equal(lse, torch.zeros_like(lse))
        for t, ref in zip(grads, ins):
            assert t.shape == ref.shape and torch.equal(t, torch.zeros_like(t))


# ---------------------------------------------------------------- layouts of memory

@variants
def test_int32_int64_bitwise_and_repeatable(builds, variant):
    emu = builds()
    ei, n, _ = power_law_graph(200, 2000)
    g = Graph.from_edge_index(ei, (n, n))
    ins = inputs(variant, g, 4, 16, torch.float32)
    seed = torch.tensor(8)
    a = run(emu, variant, g, ins, None, 0.2, p=0.2, seed=seed)
    b = run(emu, variant, as_int64(g), ins, a[3], 0.2, p=0.2, seed=seed)
    c = run(emu, variant, g, ins, a[3], 0.2, p=0.2, seed=seed)
    for x, y, z in zip([a[0], a[1]] + a[2], [b[0], b[1]] + b[2], [c[0], c[1]] + c[2]):
        assert torch.equal(x, y) and torch.equal(x, z)


# ---------------------------------------------------------------- refused

@pytest.mark.parametrize("variant", [GATV2, TRANSFORMER], ids=str)
def test_too_wide_rows_are_refused(builds, variant):
    """One warp per row: H * C above the limit (or 0) is refused, forward and backward."""
    emu = builds()
    ei, n_src, n_dst = random_graph(5, 5, 10)
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    fwd = getattr(emu, variant.op + "_forward")
    bwd = getattr(emu, variant.op + "_backward")
    for H, C in [(2, MAX_HC // 2 + 1), (1, MAX_HC + 1), (3, 0)]:
        ins = inputs(variant, g, H, C, torch.float32, edge=False)
        out = torch.zeros(n_dst, H, C)
        with pytest.raises(RuntimeError, match="H \\* C must be in \\[1, 1024\\]"):
            fwd(*ins[:3], g.rowptr, g.col, g.eid, *g.csc(), None, 1.0, 0.0, None)
        with pytest.raises(RuntimeError, match="H \\* C must be in \\[1, 1024\\]"):
            bwd(out, *ins[:3], g.rowptr, g.col, g.eid, *g.csc(), None, out, torch.zeros(n_dst, H), 1.0,
                0.0, None)


@variants
def test_entry_checks_run_first(builds, variant):
    """The CPU kernel's entry checks (shared with the CUDA entry) run before any launch."""
    emu = builds()
    ei, n_src, n_dst = random_graph(5, 5, 10)
    g = Graph.from_edge_index(ei, (n_src, n_dst))
    fwd = getattr(emu, variant.op + "_forward")
    ins = inputs(variant, g, 2, 4, torch.float32, edge=False)
    bad = list(ins[:3])
    bad[1] = bad[1][:, :1]  # one head where the others have two
    with pytest.raises(RuntimeError, match=f"{variant.arg_names[1]} must be"):
        fwd(*bad, g.rowptr, g.col, g.eid, *g.csc(), None, 1.0, 0.0, None)
    with pytest.raises(RuntimeError, match="dropout must be in"):
        fwd(*ins[:3], g.rowptr, g.col, g.eid, *g.csc(), None, 1.0, 1.0, None)
