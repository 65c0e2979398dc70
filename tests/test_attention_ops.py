"""The attention ops (GAT, GATv2, graph transformer), each on every device, against their
float64 references: adversarial graphs, large logits, a 100k-edge hub, low precision,
gradients (gradcheck, gradgradcheck, opcheck), torch.compile, determinism, dropout,
returned attention, the reference fallback and bad input. A property every variant has
is tested here once; what one variant alone has stays in its own file
(test_graph_attention.py, test_gatv2.py, test_transformer.py)."""
import os
import subprocess
import sys

import pytest
import torch

import neptune_ext
from neptune_ext import Graph
from neptune_ext.attention.reference import dropout_keep_mask

from attention_variants import GAT, GATV2, TRANSFORMER, TRANSFORMER_EDGE, VARIANTS, grads, variants, with_index
from conftest import _SEED, DEVICES, same_bits_across_thread_counts
from graph_attention_checks import rel_err
from graphs import cases, hub_graph, power_law_graph

with torch.random.fork_rng():  # the graphs follow the run's seed too (replayable)
    torch.manual_seed(_SEED)
    CASES = cases()

devices = pytest.mark.parametrize("device", DEVICES)


def graph(name, device="cpu"):
    ei, n_src, n_dst = CASES[name]
    return Graph.from_edge_index(ei, (n_src, n_dst)).to(device)


def needs_kernel(variant, device="cpu"):
    if not variant.compiled():
        pytest.skip("extension not built")
    if not neptune_ext.backend.registered(variant.op + "_forward", torch.device(device).type):
        pytest.skip(f"{variant} has no {device} kernel")


# ------------------------------------------------------------------ against the reference

@variants
@devices
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("with_edge", [False, True])
@pytest.mark.parametrize("index", ["int32", "int64"])
@pytest.mark.parametrize("C", [5, 7])
def test_matches_reference_float64(variant, device, name, with_edge, index, C):
    g = with_index(graph(name, device), index)
    ins = variant.inputs(g.num_src, g.num_dst, g.num_edges, 3, C, device=device, edge=with_edge)
    param = variant.random_param()
    out = variant(ins, g, param)
    exp = variant.reference(ins, g, param)
    torch.testing.assert_close(out, exp, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(out)
    for a, b in zip(grads(out, ins, go), grads(exp, ins, go)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=variant.grad_atol)


@variants
@devices
def test_large_logits_are_stable(variant, device):
    g = graph("random", device)
    ins = variant.inputs(g.num_src, g.num_dst, g.num_edges, 2, 4, device=device, scale=300.0)
    out = variant(ins, g)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, variant.reference(ins, g), rtol=1e-9, atol=1e-9)
    for a in grads(out, ins, torch.randn_like(out)):
        assert torch.isfinite(a).all()


@variants
@devices
@pytest.mark.parametrize("C", [4, 8])
def test_hub_with_100k_in_edges(variant, device, C):
    ei, n_src, n_dst = hub_graph()
    g = Graph.from_edge_index(ei, (n_src, n_dst)).to(device)
    ins = variant.inputs(n_src, n_dst, ei.shape[1], 2, C, device=device)
    out = variant(ins, g)
    exp = variant.reference(ins, g)
    torch.testing.assert_close(out, exp, rtol=1e-10, atol=1e-12)
    go = torch.randn_like(out)
    for a, b in zip(grads(out, ins, go), grads(exp, ins, go)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=10 * variant.grad_atol)


@variants
@devices
def test_isolated_destinations_get_zero(variant, device):
    g = Graph.from_edge_index(torch.tensor([[0, 1], [2, 2]], device=device), (2, 4))
    ins = variant.inputs(2, 4, 2, 1, 3, device=device, edge=False, requires_grad=False)
    out = variant(ins, g)
    assert torch.equal(out[[0, 1, 3]], torch.zeros_like(out[[0, 1, 3]]))
    assert out[2].abs().sum() > 0


# Per variant: whether the output is also held entry by entry (GAT's; GATv2's and the
# transformer's logits are sums of C products, whose rounding one entry can pile up), and
# how many times PyTorch's norm-wise gradient error the kernel's may be.
LOW_PRECISION = {GAT: (True, 2), GATV2: (False, 3), TRANSFORMER: (False, 3), TRANSFORMER_EDGE: (False, 3)}


@variants
@devices
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_pytorch(variant, device, dtype):
    """Error of the kernel (fp32 accumulation) vs float64 at most about twice that of the
    same computation done by plain PyTorch in `dtype`."""
    g = graph("random", device)
    ins64 = variant.inputs(g.num_src, g.num_dst, g.num_edges, 4, 16, device=device)
    low = [t.detach().to(dtype).requires_grad_() for t in ins64]
    exact_in = [t.detach().to(dtype).double().requires_grad_() for t in ins64]
    out = variant(low, g)
    ref_low = variant.reference(low, g)
    exact = variant.reference(exact_in, g)
    eps = torch.finfo(dtype).eps
    elementwise, grad_factor = LOW_PRECISION[variant]
    if elementwise:  # the largest error of one entry
        err = (out.double() - exact).abs().max().item()
        err_torch = (ref_low.double() - exact).abs().max().item()
        assert err <= 2 * err_torch + 4 * eps, (err, err_torch)
    err, err_torch = rel_err(out, exact), rel_err(ref_low, exact)
    assert err <= 2 * err_torch + 8 * eps, (err, err_torch)
    go = torch.randn_like(exact)
    for a, b, x in zip(grads(out, low, go.to(dtype)), grads(ref_low, low, go.to(dtype)),
                       grads(exact, exact_in, go)):
        # Relative to the whole gradient (a norm), not entry by entry: an entry that is a sum
        # over many edges with cancellation carries rounding of the size of its terms, which
        # the fp32-accumulating kernel and PyTorch order differently; one such entry must
        # not decide the test by chance.
        e_k, e_t = rel_err(a, x), rel_err(b, x)
        assert e_k <= grad_factor * e_t + 16 * eps, (e_k, e_t)


# ------------------------------------------------------------------ gradients, the op contract

@variants
@devices
def test_gradcheck_and_gradgradcheck(variant, device):
    g = graph("duplicates_and_self_loops", device)
    ins = variant.inputs(g.num_src, g.num_dst, g.num_edges, 2, 3, device=device)
    seed = torch.tensor(987654321)

    def f(*ins):
        return variant(ins, g, variant.param, dropout=0.25, training=True, seed=seed)

    assert torch.autograd.gradcheck(f, ins)
    assert torch.autograd.gradgradcheck(f, ins)
    assert torch.autograd.gradcheck(lambda *ins: variant(ins + (None,), g), ins[:3])


@variants
@devices
@pytest.mark.parametrize("with_dropout", [False, True])
def test_opcheck(variant, device, with_dropout):
    needs_kernel(variant, device)
    g = graph("random", device)
    ins = variant.inputs(g.num_src, g.num_dst, g.num_edges, 2, 5, device=device)
    p, seed = (0.3, torch.tensor(11)) if with_dropout else (0.0, None)
    args = (*ins[:3], g.rowptr, g.col, g.eid, *g.csc(), ins[3], variant.param, p, seed)
    torch.library.opcheck(getattr(torch.ops.neptune, variant.op + "_forward").default, args)
    out, lse = variant.raw_forward(ins, g, p=p, seed=seed)
    bargs = (torch.randn_like(out), *(t.detach() for t in ins[:3]), g.rowptr, g.col, g.eid,
             *g.csc(), ins[3].detach(), out.detach(), lse, variant.param, p, seed)
    torch.library.opcheck(getattr(torch.ops.neptune, variant.op + "_backward").default, bargs)


@variants
@devices
def test_compile_fullgraph_matches_eager(variant, device):
    torch._dynamo.reset()
    g = graph("random", device)
    ins = variant.inputs(g.num_src, g.num_dst, g.num_edges, 2, 4, dtype=torch.float32, device=device)
    f = torch.compile(lambda *ins: variant(ins, g), fullgraph=True)
    out = f(*ins)
    exp = variant(ins, g)
    torch.testing.assert_close(out, exp)
    go = torch.randn_like(out)
    for a, b in zip(grads(out, ins, go), grads(exp, ins, go)):
        torch.testing.assert_close(a, b)


@variants
@devices
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic(variant, device, dtype):
    """Same bits across runs and thread counts (fixed-order reductions, no atomics)."""
    ei, n, _ = power_law_graph(3000, 40_000)
    g = Graph.from_edge_index(ei, (n, n)).to(device)
    ins = variant.inputs(n, n, ei.shape[1], 4, 16, dtype=dtype, device=device)
    go = torch.randn(n, 4, 16, dtype=dtype, device=device)

    def run():
        out = variant(ins, g, None, 0.1, True, seed=torch.tensor(3))
        return [out] + list(grads(out, ins, go))

    same_bits_across_thread_counts(run)


def _clear_of_the_kink(variant, ins, ei, margin=1e-4):
    """ins with the edge input moved by 2 margin wherever a LeakyReLU input computed exactly
    from the float32-rounded inputs (GAT: score_dst[i] + score_src[j] + edge_logits[e];
    GATv2: x_l[j] + x_r[i] + edge_feat[e]) is within margin of 0. The kernels add those three
    float32 terms with one rounding more than float64 does, and a sum that close to 0 lands
    on either side by chance (about 6e-9 of them): the side picks the slope, 1 or 0.2, of a
    whole gradient term."""
    if variant.name not in ("gat", "gatv2"):
        return ins
    r = [t.detach().float().double() for t in ins]
    src, dst = ei
    z = r[2][dst] + r[1][src] + r[3] if variant.name == "gat" else r[0][src] + r[1][dst] + r[3]
    edge = ins[3].detach().clone()
    edge[z.abs() < margin] += 2 * margin
    return (*ins[:3], edge.requires_grad_(ins[3].requires_grad))


@variants
@pytest.mark.parametrize("isa", ["base", "auto"])
@pytest.mark.parametrize("heads,channels", [(4, 16), (8, 8), (9, 16), (3, 40)])
def test_both_cpu_builds_match_float64(variant, isa, heads, channels, monkeypatch):
    """The CPU loops run as baseline code or, where the CPU has AVX2 and FMA, as their AVX2
    build (csrc/attention/common/attention_cpu.h: run_rows); NEPTUNE_CPU_ISA=base forces the
    baseline. Each, in float32, is within float32 rounding of the float64 reference, and
    deterministic across thread counts. 8 and 9 heads of 8 or 16 channels take the float
    loops' 8-head paths (head_dots), with a remainder head for 9; heads of 40 channels
    straddle GATv2's 32-bit sign words."""
    needs_kernel(variant)
    monkeypatch.setenv("NEPTUNE_CPU_ISA", isa)
    ei, n, _ = power_law_graph(3000, 40_000)
    g = Graph.from_edge_index(ei, (n, n))
    ins64 = _clear_of_the_kink(variant, variant.inputs(n, n, ei.shape[1], heads, channels,
                                                       dtype=torch.float64), ei)
    ins = [t.detach().float().requires_grad_() for t in ins64]
    exact_in = [t.detach().float().double().requires_grad_() for t in ins64]
    out, exact = variant(ins, g), variant.reference(exact_in, g)
    # float32 rounding (6e-8) over sums of up to a few thousand edges; a wrong term is O(1)
    assert rel_err(out, exact) < 1e-5
    go = torch.randn_like(exact)
    for a, x in zip(grads(out, ins, go.float()), grads(exact, exact_in, go)):
        assert rel_err(a, x) < 1e-4

    def run():
        o = variant(ins, g)
        return [o] + list(grads(o, ins, go.float()))

    same_bits_across_thread_counts(run)


def _cpu_has_avx2_fma() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


@variants
def test_the_avx2_build_is_the_one_that_runs(variant, monkeypatch):
    """Where the CPU has AVX2 and FMA (and GCC built the loops twice), the kernels take the
    AVX2 build and NEPTUNE_CPU_ISA=base the baseline: neptune::attention_cpu_avx2 says which,
    and the two give different bits (8-lane sums and fused multiply-adds round differently
    from the baseline's), so the build that ran is the one reported."""
    needs_kernel(variant)
    monkeypatch.delenv("NEPTUNE_CPU_ISA", raising=False)
    avx2 = torch.ops.neptune.attention_cpu_avx2()
    if not avx2:
        gcc_x86 = os.uname().machine == "x86_64" and "clang" not in os.environ.get("CXX", "")
        assert not (gcc_x86 and _cpu_has_avx2_fma()), "the CPU has AVX2 + FMA but the loops do not take it"
        pytest.skip("no AVX2 build of the loops on this CPU or compiler")
    ei, n, _ = power_law_graph(2000, 30_000)
    g = Graph.from_edge_index(ei, (n, n))
    ins = [t.detach().float().requires_grad_() for t in variant.inputs(n, n, ei.shape[1], 4, 16)]
    go = None

    def run():
        nonlocal go
        o = variant(ins, g)
        go = torch.randn_like(o) if go is None else go
        return [o.detach()] + [x.detach() for x in grads(o, ins, go)]

    fast = run()
    monkeypatch.setenv("NEPTUNE_CPU_ISA", "base")
    assert not torch.ops.neptune.attention_cpu_avx2()
    base = run()
    assert not all(torch.equal(a, b) for a, b in zip(fast, base)), "the AVX2 and baseline builds gave the same bits"
    # Judged against each tensor's scale, not elementwise: an element that cancels to near
    # zero carries the rounding of its large terms (1e-3 relative seen once in CI). Over 12
    # seeds x 4 variants x 5 tensors the worst was 1.3e-6 of the tensor's largest magnitude.
    for a, b in zip(fast, base):
        assert float((a - b).abs().max()) <= 5e-5 * float(b.abs().max())


# ------------------------------------------------------------------ dropout, returned attention

@variants
@devices
@pytest.mark.parametrize("name", ["random", "isolated_destinations"])
def test_dropout_reproducible_and_matches_reference(variant, device, name):
    g = graph(name, device)
    ins = variant.inputs(g.num_src, g.num_dst, g.num_edges, 3, 4, device=device)
    a = variant(ins, g, None, 0.4, True, seed=torch.tensor(5))
    b = variant(ins, g, None, 0.4, True, seed=torch.tensor(5))
    c = variant(ins, g, None, 0.4, True, seed=torch.tensor(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    exp = variant.reference(ins, g, None, 0.4, 5)
    torch.testing.assert_close(a, exp, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(a)
    for x, y in zip(grads(a, ins, go), grads(exp, ins, go)):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=variant.grad_atol)
    # Eval mode ignores dropout; the global generator drives the seed when none is given.
    assert torch.equal(variant(ins, g, None, 0.4, False), variant(ins, g, None, 0.0, True))
    torch.manual_seed(1)
    d = variant(ins, g, None, 0.4, True)
    torch.manual_seed(1)
    assert torch.equal(d, variant(ins, g, None, 0.4, True))


def test_dropout_mask_statistics():
    keep = dropout_keep_mask(12345, torch.arange(200_000), 4, 0.3)
    frac = keep.float().mean().item()
    assert abs(frac - 0.7) < 0.005
    # Heads and neighbouring edges are decorrelated.
    assert abs((keep[:, 0] == keep[:, 1]).float().mean().item() - (0.7**2 + 0.3**2)) < 0.01
    assert abs((keep[1:, 0] == keep[:-1, 0]).float().mean().item() - (0.7**2 + 0.3**2)) < 0.01


@variants
@devices
@pytest.mark.parametrize("H,C", [(2, 3), (3, 4)])
def test_return_attention(variant, device, H, C):
    g = graph("isolated_destinations", device)
    dst = g.edge_index[1]
    ins = variant.inputs(g.num_src, g.num_dst, g.num_edges, H, C, device=device)
    out, alpha = variant(ins, g, return_attention=True)
    exp_out, exp_alpha = variant.reference(ins, g, return_attention=True)
    torch.testing.assert_close(out, exp_out)
    torch.testing.assert_close(alpha, exp_alpha)
    sums = torch.zeros(g.num_dst, H, dtype=alpha.dtype, device=device).index_add(0, dst, alpha)
    has = torch.bincount(dst, minlength=g.num_dst) > 0
    torch.testing.assert_close(sums[has], torch.ones_like(sums[has]))
    assert torch.equal(out[~has], torch.zeros_like(out[~has]))


# ------------------------------------------------------------------ the reference fallback

@pytest.mark.parametrize("variant,fewer_rows", [pytest.param(v, k, id=f"{v}-{k}fewer")
                                                for v in VARIANTS for k in ((0, 3) if v.fewer_rows else (0,))])
@pytest.mark.parametrize("C", [3, 4])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_reference_fallback_matches(monkeypatch, variant, fewer_rows, C, dropout):
    g = graph("random")
    ins = variant.inputs(g.num_src, g.num_dst - fewer_rows, g.num_edges, 2, C)
    fused = variant(ins, g, None, dropout, True, seed=torch.tensor(9))
    monkeypatch.setenv("NEPTUNE_FORCE_REFERENCE", "1")
    ref = variant(ins, g, None, dropout, True, seed=torch.tensor(9))
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ bad input

def _bad(variant):
    """Bad arguments every variant refuses, named after its own arguments."""
    x0, x3 = variant.arg_names[0], variant.arg_names[3]
    return [
        (lambda a: {x0: a[x0].long()}, f"{x0} must be a floating-point"),
        (lambda a: {x0: [1, 2]}, f"{x0} must be a torch.Tensor"),
        (lambda a: {x3: a[x3][:-1]}, f"{x3} must have shape"),
        (lambda a: dict(dropout=1.0), r"dropout must be a float in \[0, 1\)"),
        (lambda a: dict(dropout=-0.1), r"dropout must be a float in \[0, 1\)"),
        (lambda a: {variant.param_name: float("nan")}, variant.param_name),
        (lambda a: dict(graph=a["graph"].edge_index), "graph must be a neptune_ext.Graph"),
        (lambda a: dict(graph=None), "graph must be a neptune_ext.Graph"),
    ]


BAD = {
    GAT: [
        (lambda a: dict(h=a["h"][:, :, 0]), r"h must have shape \[N_src, H, C\]"),
        (lambda a: dict(h=a["h"][:-1], score_src=a["score_src"][:-1]),
         "h has .* source nodes but the graph has num_src"),
        (lambda a: dict(score_src=a["score_src"][:, :1]), r"score_src must have shape"),
        (lambda a: dict(score_dst=a["score_dst"][:-1]), "score_dst has .* destination nodes"),
        (lambda a: dict(score_dst=a["score_dst"][:, :1]), r"score_dst must have shape"),
        (lambda a: dict(edge_logits=a["edge_logits"][:-1]), r"edge_logits must have shape \[E, H\]"),
    ],
    GATV2: [
        (lambda a: dict(x_r=a["x_r"][:, :1]), "x_r must have shape"),
        (lambda a: dict(att=a["att"][:1]), "att must have shape"),
        (lambda a: dict(x_l=a["x_l"][:-1]), "source nodes"),
    ],
    TRANSFORMER: [
        (lambda a: dict(k=a["k"][:, :1]), "k must have shape"),
        (lambda a: dict(v=a["v"][:-1]), "v must have the shape of k"),
        (lambda a: dict(q=a["q"][:-1]), "destination nodes"),
        (lambda a: dict(k=a["k"][:-1], v=a["v"][:-1]), "source nodes"),
        (lambda a: dict(q=a["q"][:, :, :0]), "C > 0"),
    ],
    TRANSFORMER_EDGE: [
        (lambda a: dict(kv=a["kv"][:, :1]), "kv must have shape"),
        (lambda a: dict(w_edge=a["w_edge"][:1]), "w_edge must have shape"),
        (lambda a: dict(q=a["q"][:-1]), "destination nodes"),
        (lambda a: dict(kv=a["kv"][:-1]), "source nodes"),
        (lambda a: dict(edge_attr=a["edge_attr"][:, :1]), r"edge_attr must have shape \[E, D\]"),
        (lambda a: dict(q=a["q"][:, :, :0]), "C > 0"),
    ],
}


@pytest.mark.parametrize("variant,bad,words", [
    pytest.param(v, bad, words, id=f"{v}-{i}") for v in VARIANTS for i, (bad, words) in enumerate(_bad(v) + BAD[v])])
def test_bad_inputs_name_the_argument(variant, bad, words):
    g = graph("random")
    ins = variant.inputs(g.num_src, g.num_dst, g.num_edges, 2, 4, requires_grad=False)
    args = variant.kwargs(ins, g)
    args.update(bad(args))
    with pytest.raises(ValueError, match=words):
        variant.public(*(args.pop(n) for n in variant.arg_names[:3]), args.pop("graph"),
                       edge=args.pop(variant.arg_names[3]), **args)


# Which inputs are bfloat16 (the others float32) in the mixed-dtype test: a projection
# under autocast beside a float32 parameter, as PyG's layers meet them.
MIXED_BF16 = {GAT: (True, False, False, False), GATV2: (True, True, False, True),
              TRANSFORMER: (True, False, True, True), TRANSFORMER_EDGE: (True, True, False, False)}


@variants
def test_mixed_dtypes_run_in_the_promoted_dtype(variant):
    """As torch's binary ops (and PyG's layers under autocast): mixed bfloat16 and float32
    inputs are computed, and returned, in float32 - the same numbers as with them cast."""
    g = graph("random")
    ins = variant.inputs(g.num_src, g.num_dst, g.num_edges, 2, 4, requires_grad=False)
    mixed = [t.bfloat16() if low else t.float() for t, low in zip(ins, MIXED_BF16[variant])]
    out = variant(mixed, g)
    assert out.dtype == torch.float32
    want = variant([t.float() for t in mixed], g)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    # A float64 input wins over float32 ones.
    assert variant([ins[0]] + [t.float() for t in ins[1:]], g).dtype == torch.float64


_DIRECT_CALLS = r"""
import sys
import torch
from neptune_ext import Graph
sys.path.insert(0, {tests!r})
from attention_variants import VARIANTS
variant = [v for v in VARIANTS if v.name == {name!r}][0]
fwd = getattr(torch.ops.neptune, variant.op + "_forward")
bwd = getattr(torch.ops.neptune, variant.op + "_backward")
g = Graph.from_edge_index(torch.tensor([[0, 1, 2], [1, 2, 0]]), (3, 3))
ins = variant.inputs(3, 3, 3, 2, 4, requires_grad=False)[:3]
param = variant.param
colptr, csc_row, csc_perm = g.csc()
i32 = lambda *v: torch.tensor(v, dtype=torch.int32)


def refused(exc, word, *args):
    try:
        fwd(*args)
    except exc as e:
        assert word in str(e), (word, e)
        return
    raise SystemExit("accepted: " + word)


for col in (i32(0, 7, 1), i32(0, -1, 1), i32(0, 2**30, 1)):
    refused(ValueError, "col", *ins, g.rowptr, col, g.eid, colptr, csc_row, csc_perm, None, param, 0.0, None)
refused(ValueError, "eid", *ins, g.rowptr, g.col, i32(0, 0, 1), colptr, csc_row, csc_perm, None, param, 0.0, None)
refused(RuntimeError, "rowptr must be", *ins, g.rowptr[:-1], g.col, g.eid, colptr, csc_row, csc_perm, None,
        param, 0.0, None)
refused(RuntimeError, "needs seed", *ins, g.rowptr, g.col, g.eid, colptr, csc_row, csc_perm, None, param, 0.5, None)
for args, word in {shapes}:
    refused(RuntimeError, word, *[eval(a) for a in args], g.rowptr, g.col, g.eid, colptr, csc_row, csc_perm,
            None, param, 0.0, None)
out, lse = fwd(*ins, g.rowptr, g.col, g.eid, colptr, csc_row, csc_perm, None, param, 0.0, None)
for csc in ((colptr, csc_row.flip(0).contiguous(), csc_perm), (colptr, csc_row, csc_perm.flip(0).contiguous())):
    try:
        bwd(torch.ones_like(out), *ins, g.rowptr, g.col, g.eid, *csc, None, out, lse, param, 0.0, None)
        raise SystemExit("a wrong CSC was accepted")
    except ValueError:
        pass
print("ok")
"""

# Raw-op shape errors one variant's entry checks name: (the three inputs as expressions
# over ins, the words).
RAW_SHAPES = {
    GAT: [],
    GATV2: [],
    TRANSFORMER: [(("ins[0][:2]", "ins[1]", "ins[2]"), "rowptr"),
                  (("ins[0]", "ins[1]", "ins[2][:, :1]"), "v must"),
                  (("ins[0]", "ins[1][:, :, :2]", "ins[2][:, :, :2]"), "k must")],
    TRANSFORMER_EDGE: [(("ins[0][:2]", "ins[1]", "ins[2]"), "rowptr"),
                       (("ins[0]", "ins[1][:, :1]", "ins[2]"), "kv must"),
                       (("ins[0]", "ins[1]", "ins[2][:1]"), "w_edge must")],
}


@variants
def test_direct_op_calls_with_bad_graphs_raise(variant):
    """A direct torch.ops call with a corrupt graph or mismatched tensors is an error naming
    the argument, never a crash (in a subprocess, so a crash fails the test, not the run)."""
    needs_kernel(variant)
    code = _DIRECT_CALLS.format(tests=os.path.dirname(os.path.abspath(__file__)), name=variant.name,
                                shapes=RAW_SHAPES[variant])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, (res.stdout + res.stderr)[-3000:]
