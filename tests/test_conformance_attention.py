"""Conformance: the attention layers on the paths users take, against PyG's layers.

The product {GraphAttention, GraphAttentionV2, GraphTransformer} x {float64, bf16 autocast, fp16 autocast}
x {train, eval} x {every edge form PyG accepts} x {plain, bipartite, (x_src, None)} x
{CPU, CUDA where present} runs in full in eager mode: outputs, attention weights and
gradients against GATConv / GATv2Conv / TransformerConv with the same weights (float64: to 1e-9; under
autocast: the error against a float64 oracle fed autocast's own projections is at most
twice PyG's error under the same autocast, in norm, plus one rounding at that precision),
and the output dtype
PyG gives. Double backward (a gradient penalty) and pickling run on every float64 case
in train / eval mode respectively. torch.compile runs a fixed sample (TestCompile): one
compile costs seconds here, the product would cost an hour.

The oracle always gets the same graph as an int64 COO edge_index with an explicit size;
attention weights are compared as dense [N_dst, N_src, H] matrices (the graphs have no
duplicate edges), so every edge form is judged by the same numbers whatever its order.
"""
import contextlib
import inspect
import io
import itertools
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta",
                                        "ignore:Sparse invariant checks")

from conftest import DEVICES
from neptune_ext import Graph
from neptune_ext.graph import sparse_to_edge_index
from neptune_ext.nn import GraphAttention, GraphAttentionV2, GraphTransformer

pyg = pytest.importorskip("torch_geometric")
from torch_geometric import EdgeIndex  # noqa: E402
from torch_geometric.nn import GATConv, GATv2Conv, TransformerConv  # noqa: E402

LAYERS = {"gat": (GraphAttention, GATConv), "gatv2": (GraphAttentionV2, GATv2Conv),
          "transformer": (GraphTransformer, TransformerConv)}
PRECISIONS = ["float64", "bf16-autocast", "fp16-autocast"]
# Roundings at autocast's precision allowed beyond twice PyG's error (see the autocast check).
# GraphTransformer: the gradient of its beta gate's weight comes from x_r - out, which
# cancels; PyG's own error on it varies 10x from seed to seed (ours/PyG's: median 0.9, up to
# 4.5 in 25 seeds), so twice one sample of it is a coin toss - the slack of 3 roundings
# covers the lucky draws of PyG's error, not a worse error of ours.
ROUNDINGS = {"gat": 1, "gatv2": 1, "transformer": 3}
# (name, add_self_loops): every form of edge_index a PyG user passes. Without self loops a
# CSR adjacency and an EdgeIndex sorted by destination take the no-sort path.
FORMS = [("edge_index", True), ("edge_index-int32", False), ("sparse-coo", True),
         ("sparse-csr", True), ("sparse-csr-noloops", False), ("EdgeIndex", False),
         ("Graph", False)]
XFORMS = ["plain", "bipartite", "src-only"]
F_SRC, F_DST, HEADS, OUT, EDGE_DIM = 12, 7, 2, 5, 3


def make_graph(n_src, n_dst, e, device):
    """A random graph without duplicate edges, with some self loops and isolated nodes, in
    a shuffled (caller) order."""
    key = torch.randperm(n_src * n_dst)[:e]
    ei = torch.stack([key % n_src, key // n_src])
    loops = torch.arange(min(3, n_src, n_dst))
    ei = torch.cat([ei, loops.repeat(2, 1)], dim=1)
    ei = torch.unique(ei[1] * n_src + ei[0])  # unique, sorted by (dst, src)
    ei = torch.stack([ei % n_src, ei // n_src])
    ei = ei[:, torch.randperm(ei.shape[1])]
    return ei.to(device)


def edge_form(form, ei, n_src, n_dst):
    """(the layer's edge input, the edge order it implies as a [2, E] index)."""
    if form == "edge_index":
        return ei, ei
    if form == "edge_index-int32":
        return ei.to(torch.int32), ei
    order = torch.argsort(ei[1] * n_src + ei[0])  # the order a coalesced/CSR adjacency has
    ei_sorted = ei[:, order]
    adj = torch.sparse_coo_tensor(torch.stack([ei_sorted[1], ei_sorted[0]]),
                                  torch.ones(ei.shape[1], device=ei.device), (n_dst, n_src)).coalesce()
    if form == "sparse-coo":
        return adj, ei_sorted
    if form.startswith("sparse-csr"):
        return adj.to_sparse_csr(), ei_sorted
    if form == "EdgeIndex":
        return EdgeIndex(ei_sorted, sparse_size=(n_src, n_dst), sort_order="col"), ei_sorted
    if form == "Graph":
        return Graph.from_edge_index(ei, (n_src, n_dst)), ei
    raise AssertionError(form)


def dense_alpha(ei_out, alpha, n_src, n_dst):
    """Attention weights [E, H] on edges [2, E] (or a sparse [N_dst, N_src, H]) as dense."""
    if isinstance(ei_out, torch.Tensor) and ei_out.layout != torch.strided:
        if ei_out.dim() == 3:  # the weights as a sparse [N_dst, N_src, H] (GATConv's form)
            return ei_out.to_dense()
        ei_out = sparse_to_edge_index(ei_out)  # the adjacency as given, alpha in its order
    ei_out = ei_out.as_subclass(torch.Tensor) if type(ei_out) is not torch.Tensor else ei_out
    dense = alpha.new_zeros(n_dst, n_src, alpha.shape[1])
    dense[ei_out[1].long(), ei_out[0].long()] = alpha
    return dense


def build(layer, xform, loops, mode):
    ours_cls, ref_cls = LAYERS[layer]
    in_ch = (F_SRC, F_DST) if xform == "bipartite" else F_SRC
    kw = dict(heads=HEADS, edge_dim=EDGE_DIM)
    kw.update(beta=True) if layer == "transformer" else kw.update(add_self_loops=loops)
    ref = ref_cls(in_ch, OUT, **kw).double()
    ours = ours_cls(in_ch, OUT, **kw).double()
    with torch.no_grad():  # non-zero biases: the head is compared too
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    ours.load_state_dict(ref.state_dict())
    ref.train(mode == "train")
    ours.train(mode == "train")
    return ours, ref


def inputs(xform, n_src, n_dst, device):
    x_src = torch.randn(n_src, F_SRC, dtype=torch.float64, device=device)
    if xform == "plain":
        return x_src
    if xform == "bipartite":
        return x_src, torch.randn(n_dst, F_DST, dtype=torch.float64, device=device)
    return x_src, None


def leaves(x):
    return [t for t in (x if isinstance(x, tuple) else (x,)) if t is not None]


def fresh(x, dtype=None):
    def one(t):
        if t is None:
            return None
        return t.detach().to(dtype or t.dtype).requires_grad_()
    return tuple(one(t) for t in x) if isinstance(x, tuple) else one(x)


def size_kw(layer_mod, edge, n_src, n_dst):
    """size=(n_src, n_dst) with a plain edge_index, for layers whose forward takes it
    (GATv2Conv's does not: it sizes from x)."""
    if (type(edge) is torch.Tensor and edge.layout == torch.strided
            and "size" in inspect.signature(layer_mod.forward).parameters):
        return {"size": (n_src, n_dst)}
    return {}


def run(layer_mod, x, edge, ea, n_src, n_dst, autocast=None, device="cpu"):
    """Output, dense attention weights, and the gradients of a fixed projection of the
    output with respect to the inputs and the parameters."""
    kwargs = dict(return_attention_weights=True, **size_kw(layer_mod, edge, n_src, n_dst))
    ctx = torch.autocast(device, autocast) if autocast else torch.autocast(device, enabled=False)
    with ctx:
        out, (ei_out, alpha) = layer_mod(x, edge, ea, **kwargs)
    dense = dense_alpha(ei_out, alpha, n_src, n_dst)
    torch.manual_seed(1234)
    proj = torch.randn(out.shape, dtype=torch.float64, device=out.device)
    ins = leaves(x) + [p for p in layer_mod.parameters()]
    grads = torch.autograd.grad((out.double() * proj).sum(), ins, allow_unused=True)
    return out, dense, grads


def rel_err(a, b):
    return float((a.detach().double() - b.detach().double()).norm())


CASES = list(itertools.product(DEVICES, LAYERS, PRECISIONS, ["train", "eval"], FORMS, XFORMS))


def case_id(c):
    dev = c[0].values[0] if hasattr(c[0], "values") else c[0]
    return "-".join([dev, c[1], c[2], c[3], c[4][0], c[5]])


@pytest.mark.parametrize("device, layer, precision, mode, form, xform",
                         [pytest.param(*c, id=case_id(c)) if not hasattr(c[0], "values") else
                          pytest.param(c[0].values[0], *c[1:], id=case_id(c), marks=c[0].marks)
                          for c in CASES])
def test_layer_matches_pyg(device, layer, precision, mode, form, xform):
    form_name, loops = form
    if precision == "fp16-autocast" and device == "cpu" and not _cpu_fp16_autocast():
        pytest.skip("this torch has no float16 CPU autocast")
    n_src = 23
    n_dst = 17 if xform == "bipartite" else n_src
    ei = make_graph(n_src, n_dst, 90, device)
    edge, ei_order = edge_form(form_name, ei, n_src, n_dst)
    ours, ref = build(layer, xform, loops, mode)
    ours, ref = ours.to(device), ref.to(device)
    x = inputs(xform, n_src, n_dst, device)
    ea = torch.randn(ei.shape[1], EDGE_DIM, dtype=torch.float64, device=device)
    ea_ours = ea if form_name in ("edge_index", "edge_index-int32", "Graph") else _reorder(ea, ei, ei_order, n_src)

    if layer in ("gatv2", "transformer") and xform == "src-only":  # these need x_dst too
        with pytest.raises(ValueError, match="x_dst"):
            ours(x, edge, ea_ours)
        return

    if precision == "float64":
        o2, a2, g2 = run(ours, fresh(x), edge, ea_ours, n_src, n_dst, device=device)
        o1, a1, g1 = run(ref, fresh(x), ei, ea, n_src, n_dst, device=device)
        assert o2.dtype == o1.dtype == torch.float64
        torch.testing.assert_close(o2, o1, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(a2, a1, rtol=1e-9, atol=1e-10)
        for i, (a, b) in enumerate(zip(g1, g2)):
            if a is None:
                assert b is None or not b.any(), f"gradient {i}: PyG has none, ours is non-zero"
            else:
                torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-9, msg=lambda m: f"gradient {i}: {m}")
        if mode == "train":
            _check_double_backward(ours, ref, x, edge, ea_ours, ei, ea, n_src, n_dst)
        else:
            _check_pickle(ours, x, edge, ea_ours, n_src, n_dst)
        return

    # autocast: PyG under the same autocast (float32 weights) and ours, against a float64
    # oracle fed the very projections autocast computes (its Linear outputs replaced by the
    # low-precision values, gradients exact). Both layers share those projections; what is
    # judged is everything after them. Against an oracle with exact projections a logit
    # within a rounding of 0 lands on either side of LeakyReLU's kink by chance, in ours or
    # in PyG's, and moves whole gradient rows.
    # LeakyReLU's kink (GAT): ours and PyG compute a logit in float32 from the same
    # low-precision projections, each summing in its own order; an oracle logit within a
    # rounding of 0 would put ours and PyG on different sides by chance (one whole gradient
    # term moved by 0.8 of the slope). Inputs whose oracle puts any LeakyReLU input within
    # KINK_MARGIN of 0 are drawn again. (GATv2's LeakyReLU inputs are sums of two or three
    # low-precision values, exact or rounded without a change of sign in float32: no chance
    # there, and exact zeros are common - its inputs are not redrawn.)
    low = torch.bfloat16 if precision == "bf16-autocast" else torch.float16
    for _ in range(50):
        kink = []
        with autocast_projections(ref, low, device), _leaky_relu_inputs(kink):
            o_true, a_true, g_true = run(ref, fresh(x), ei, ea, n_src, n_dst, device=device)
        if layer != "gat" or all(float(t.abs().min()) >= KINK_MARGIN for t in kink if t.numel()):
            break
        x = inputs(xform, n_src, n_dst, device)
    else:
        raise AssertionError("the oracle's LeakyReLU inputs keep landing on the kink")
    assert bool(kink) == (layer in ("gat", "gatv2")), "the LeakyReLU inputs were not seen"
    ref32, ours32 = ref.float(), ours.float()
    o1, a1, g1 = run(ref32, fresh(x, torch.float32), ei, ea.float(), n_src, n_dst, low, device)
    o2, a2, g2 = run(ours32, fresh(x, torch.float32), edge, ea_ours.float(), n_src, n_dst, low, device)
    assert o2.dtype == o1.dtype, f"PyG returns {o1.dtype} under autocast, ours {o2.dtype}"
    # In norm: at most twice PyG's error, plus ROUNDINGS[layer] roundings at autocast's precision.
    eps = torch.finfo(low).eps * ROUNDINGS[layer]
    for what, t, a, b in [("output", o_true, o1, o2), ("attention", a_true, a1, a2)] + [
            (f"gradient {i}", t, a, b) for i, (t, a, b) in enumerate(zip(g_true, g1, g2))]:
        if t is None or a is None:
            continue
        assert b is not None, f"{what}: PyG has a gradient, ours none"
        err, pyg_err, scale = rel_err(b, t), rel_err(a, t), float(t.detach().double().norm())
        assert err <= 2.0 * pyg_err + eps * (scale + 1e-3), (
            f"{what}: error {err:.3g} against the oracle, PyG's own under the same autocast {pyg_err:.3g}")


# |LeakyReLU input| below which the autocast comparison draws new inputs: float32 rounding
# of a logit of order 1 is ~1e-7 (ours and PyG both sum in float32).
KINK_MARGIN = 1e-4


@contextlib.contextmanager
def _leaky_relu_inputs(seen):
    """While active, every torch.nn.functional.leaky_relu call (PyG's GAT layers call it
    through the module) appends its input to ``seen``."""
    orig = torch.nn.functional.leaky_relu

    def recording(input, *args, **kwargs):
        seen.append(input.detach())
        return orig(input, *args, **kwargs)
    torch.nn.functional.leaky_relu = recording
    try:
        yield
    finally:
        torch.nn.functional.leaky_relu = orig


@contextlib.contextmanager
def autocast_projections(model, low, device):
    """While active, every Linear of ``model`` (float64) returns the values it computes
    under autocast(low) from float32 inputs and weights, with its float64 gradient."""
    def hook(mod, inp, out):
        with torch.autocast(device, low):
            y = torch.nn.functional.linear(inp[0].float(), mod.weight.float(),
                                           None if mod.bias is None else mod.bias.float())
        return out + (y.double() - out).detach()
    linears = [m for m in model.modules()
               if isinstance(getattr(m, "weight", None), torch.nn.Parameter) and m.weight.dim() == 2
               and not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in linears]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _reorder(ea, ei, ei_order, n_src):
    """Edge attributes of ``ei`` rearranged into the edge order ``ei_order``."""
    key = ei[1] * n_src + ei[0]
    pos = torch.argsort(key)
    target = ei_order[1] * n_src + ei_order[0]
    return ea[pos[torch.searchsorted(key[pos], target)]]


def _cpu_fp16_autocast():
    try:
        with torch.autocast("cpu", torch.float16):
            return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16
    except Exception:
        return False


def _check_double_backward(ours, ref, x, edge, ea_ours, ei, ea, n_src, n_dst):
    """A gradient penalty: d/dparams of ||d out / d x||^2, the same as PyG's."""
    results = []
    for mod, e, a in ((ours, edge, ea_ours), (ref, ei, ea)):
        xs = fresh(x)
        out = mod(xs, e, a, **size_kw(mod, e, n_src, n_dst))
        gx = torch.autograd.grad(out.pow(2).sum(), leaves(xs), create_graph=True)
        penalty = sum(g.pow(2).sum() for g in gx)
        params = [p for p in mod.parameters()]
        results.append(torch.autograd.grad(penalty, params, allow_unused=True))
    for (name, _), a, b in zip(ref.named_parameters(), results[1], results[0]):
        if a is None:
            assert b is None or not b.any(), name
        else:
            torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-9, msg=lambda m: f"{name}: {m}")


def _check_pickle(ours, x, edge, ea, n_src, n_dst):
    """torch.save(model) after a forward (the graph cache is filled) and back."""
    kwargs = size_kw(ours, edge, n_src, n_dst)
    with torch.no_grad():
        before = ours(x, edge, ea, **kwargs)
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(back(x, edge, ea, **kwargs), before, rtol=0, atol=0)


class TestCompile:
    """torch.compile on a fixed sample of the product (each compile costs seconds)."""

    SAMPLE = [("gat", "edge_index", "train", None), ("gatv2", "edge_index", "train", None),
              ("transformer", "edge_index", "train", None), ("transformer", "Graph", "eval", torch.bfloat16),
              ("gat", "Graph", "eval", torch.bfloat16), ("gatv2", "Graph", "eval", torch.bfloat16),
              ("gatv2", "edge_index-int32", "eval", None)]

    @pytest.mark.parametrize("layer, form, mode, autocast", SAMPLE)
    def test_compiled_equals_eager(self, layer, form, mode, autocast):
        torch._dynamo.reset()
        n = 19
        ei = make_graph(n, n, 60, "cpu")
        edge, _ = edge_form(form, ei, n, n)
        loops = dict(FORMS)[form]
        ours, _ = build(layer, "plain", loops, mode)
        ours = ours.float()
        x = torch.randn(n, F_SRC)
        ea = torch.randn(ei.shape[1], EDGE_DIM)
        compiled = torch.compile(ours, fullgraph=True)
        ctx = torch.autocast("cpu", autocast) if autocast else torch.autocast("cpu", enabled=False)
        with ctx:
            xs1, xs2 = fresh(x), fresh(x)
            kw = size_kw(ours, edge, n, n)
            want = ours(xs1, edge, ea, **kw)
            got = compiled(xs2, edge, ea, **kw)
        assert got.dtype == want.dtype
        tol = dict(rtol=1e-5, atol=1e-5) if autocast is None else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(got, want, **tol)
        go = torch.randn_like(want)
        g1 = torch.autograd.grad(want, xs1, go)[0]
        g2 = torch.autograd.grad(got, xs2, go)[0]
        torch.testing.assert_close(g2, g1, **tol)


def test_saved_layer_loads_in_a_fresh_process(tmp_path):
    """torch.save(model) of every layer after a forward, loaded and run in a new process."""
    torch.manual_seed(0)
    x = torch.randn(12, F_SRC)
    ei = make_graph(12, 12, 40, "cpu")
    mods = [GraphAttention(F_SRC, OUT, heads=HEADS), GraphAttentionV2(F_SRC, OUT, heads=HEADS),
            GraphTransformer(F_SRC, OUT, heads=HEADS, beta=True)]
    outs = []
    for m in mods:
        m.eval()
        with torch.no_grad():
            outs.append(m(x, ei))
    torch.save({"mods": mods, "x": x, "ei": ei, "outs": outs}, tmp_path / "m.pt")
    code = (f"import torch, neptune_ext\n"
            f"d = torch.load({str(tmp_path / 'm.pt')!r}, weights_only=False)\n"
            f"for m, o in zip(d['mods'], d['outs']):\n"
            f"    with torch.no_grad():\n"
            f"        assert torch.equal(m(d['x'], d['ei']), o), type(m).__name__\n"
            f"print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
