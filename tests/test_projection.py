"""The layers' node projections (neptune_ext.attention.projection, neptune::linear): the same
numbers as torch's Linear (against float64), gradients for every input combination, double
backward, opcheck, compile, the cases that must call the module instead (hooks, subclasses,
autocast, other dtypes, small products, oneDNN disabled), clear errors, and the three
layers at sizes that take the op, against PyG."""
import pytest
import torch
from torch import nn

from neptune_ext import backend
from neptune_ext.attention import projection
from neptune_ext.attention.projection import MIN_MACS, project

needs_op = pytest.mark.skipif(not backend.runs_kernel("linear", "cpu"),
                              reason="the extension's neptune::linear is not built")


@pytest.fixture(autouse=True)
def _op_wins_here(monkeypatch):
    """The layers take the op only on CPUs where it won (projection.USE_ONEDNN: AMD); these
    tests exercise it on any CPU."""
    monkeypatch.setattr(projection, "USE_ONEDNN", True)

# (rows, in, out): oneDNN's forward, its weight gradient (in >= 256) and torch's mm for the
# weight gradient (in < 256), a product just over the threshold, and one under it.
SHAPES = [(1500, 700, 64), (3000, 128, 96), (1025, 32, 32), (37, 19, 5)]


def _relerr(a, b, floor=1e-30):
    return float((a.double() - b).abs().max() / b.abs().max().clamp_min(floor))


def _float64_grads(x, lin, go):
    xd = x.detach().double().requires_grad_()
    wd = lin.weight.detach().double().requires_grad_()
    bd = None if lin.bias is None else lin.bias.detach().double().requires_grad_()
    y = torch.nn.functional.linear(xd, wd, bd)
    y.backward(go.double())
    return y, xd.grad, wd.grad, None if bd is None else bd.grad


@needs_op
@pytest.mark.parametrize("rows, fin, fout", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_grad", [True, False])
def test_matches_float64_linear(rows, fin, fout, bias, x_grad):
    lin = nn.Linear(fin, fout, bias=bias)
    x = torch.randn(rows, fin, requires_grad=x_grad)
    y = project(lin, x)
    go = torch.randn_like(y)
    y.backward(go)
    want, gx, gw, gb = _float64_grads(x, lin, go)
    # float32 GEMMs: float32 rounding (2^-24 ~ 6e-8) grown over sums of up to 3,000 terms
    # (observed: up to 1.3e-6); a wrong operand gives errors of order 1
    tol = 2e-5
    assert _relerr(y, want) < tol
    assert _relerr(lin.weight.grad, gw) < tol
    if bias:
        assert _relerr(lin.bias.grad, gb) < tol
    if x_grad:
        assert _relerr(x.grad, gx) < tol
    else:
        assert x.grad is None


@needs_op
def test_big_products_take_the_op_small_ones_the_module():
    lin = nn.Linear(600, 64)
    with torch.autograd.profiler.profile() as prof:
        project(lin, torch.randn(2000, 600))
        project(lin, torch.randn(3, 600))
    calls = [e.name for e in prof.function_events]
    assert calls.count("neptune::linear") == 1
    assert 2000 * 600 * 64 >= MIN_MACS > 3 * 600 * 64


@needs_op
def test_cpus_where_the_op_loses_call_the_module(monkeypatch):
    """USE_ONEDNN follows the CPU (neptune::linear_prefers_onednn: AMD x86) unless
    NEPTUNE_LINEAR_ONEDNN says otherwise; where it is off, every projection is the module's
    own call (the same numbers as torch's Linear, bit for bit)."""
    env = {"0": False, "1": True}.get(__import__("os").environ.get("NEPTUNE_LINEAR_ONEDNN", ""))
    assert projection._use_onednn_default() == (
        env if env is not None else torch.ops.neptune.linear_prefers_onednn())
    monkeypatch.setenv("NEPTUNE_LINEAR_ONEDNN", "0")
    assert projection._use_onednn_default() is False
    monkeypatch.setenv("NEPTUNE_LINEAR_ONEDNN", "1")
    assert projection._use_onednn_default() is True
    monkeypatch.setenv("NEPTUNE_LINEAR_ONEDNN", "yes")
    with pytest.warns(RuntimeWarning, match="NEPTUNE_LINEAR_ONEDNN must be 0 or 1"):
        projection._use_onednn_default()
    monkeypatch.setattr(projection, "USE_ONEDNN", False)
    lin = nn.Linear(600, 64)
    x = torch.randn(2000, 600)
    with torch.autograd.profiler.profile() as prof:
        y = project(lin, x)
    assert "neptune::linear" not in [e.name for e in prof.function_events]
    assert torch.equal(y, lin(x))


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_large_outputs_take_torchs_gemm_into_cached_buffers(dtype, bias, monkeypatch):
    """Where oneDNN is off, a projection whose output is large (projection.CACHE_MIN_BYTES)
    takes the op with onednn=False - torch's own addmm/mm into a buffer from the extension's
    cache: the output and every gradient are the module's to the bit. A smaller output, or
    the cache switched off, calls the module."""
    import copy
    monkeypatch.setattr(projection, "USE_ONEDNN", False)
    item = torch.empty(0, dtype=dtype).element_size()
    rows = projection.CACHE_MIN_BYTES // (96 * item) + 1 + int(torch.randint(0, 50, ()))
    lin = nn.Linear(64, 96, bias=bias).to(dtype)
    ref = copy.deepcopy(lin)
    x = torch.randn(rows, 64, dtype=dtype, requires_grad=True)
    xr = x.detach().clone().requires_grad_()

    def op_calls(fn):
        with torch.autograd.profiler.profile() as prof:
            out = fn()
        return out, [e.name for e in prof.function_events].count("neptune::linear")

    y, calls = op_calls(lambda: project(lin, x))
    assert calls == 1
    yr = ref(xr)
    assert torch.equal(y, yr)
    go = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *lin.parameters()], go)
    want = torch.autograd.grad(yr, [xr, *ref.parameters()], go)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    small = x.detach()[:rows // 2]
    assert op_calls(lambda: project(lin, small))[1] == 0
    monkeypatch.setattr(projection, "_cache_on", lambda: False)
    y_off, calls = op_calls(lambda: project(lin, x))
    assert calls == 0 and torch.equal(y_off, yr)


@needs_op
def test_non_contiguous_input_and_empty():
    lin = nn.Linear(512, 80)
    x = torch.randn(512, 3000).t()  # [3000, 512], transposed storage
    y = project(lin, x)
    assert _relerr(y, torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())) < 5e-6
    big = nn.Linear(5000, 300)
    assert project(big, torch.randn(0, 5000)).shape == (0, 300)
    y = torch.ops.neptune.linear(torch.randn(0, 5000, requires_grad=True), big.weight, big.bias)
    y.sum().backward()
    assert torch.equal(big.weight.grad, torch.zeros_like(big.weight))


@needs_op
def test_double_backward_matches_linear():
    lin = nn.Linear(600, 64).double().float()
    ref = nn.Linear(600, 64)
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(2000, 600, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    outs = []
    for m, inp in ((lin, x), (ref, xr)):
        y = project(m, inp) if m is lin else m(inp)
        g, = torch.autograd.grad((y ** 2).sum(), inp, create_graph=True)
        (g ** 2).sum().backward()
        outs.append((m.weight.grad, m.bias.grad))
    for a, b in zip(*outs):
        assert _relerr(a, b.double()) < 1e-5


@needs_op
def test_opcheck_and_compile():
    from torch.library import opcheck
    x = torch.randn(1500, 700, requires_grad=True)
    w = torch.randn(64, 700, requires_grad=True)
    b = torch.randn(64, requires_grad=True)
    for args in ((x, w, b), (x.detach(), w, None), (torch.randn(4, 3), torch.randn(2, 3), None),
                 (x, w, b, False), (torch.randn(9000, 70, requires_grad=True), w[:, :70], None, False)):
        opcheck(torch.ops.neptune.linear, args)
    lin = nn.Linear(700, 64)
    fn = torch.compile(lambda t: project(lin, t), fullgraph=True)
    xx = torch.randn(1500, 700)
    assert _relerr(fn(xx), torch.nn.functional.linear(xx.double(), lin.weight.double(), lin.bias.double())) < 5e-6


@needs_op
def test_compiled_projection_does_not_guard_on_the_node_count():
    """Under torch.compile the size threshold is not asked (the kernel itself sends small
    products to at::linear): one graph serves every node count."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    lin, cnt = nn.Linear(700, 64), CompileCounter()
    fn = torch.compile(lambda t: project(lin, t), backend=cnt, dynamic=True, fullgraph=True)
    for rows in (2000, 7, 3000):
        x = torch.randn(rows, 700)
        assert _relerr(fn(x), torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())) < 2e-5
    assert cnt.frame_count == 1


class _Scaled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


@needs_op
def test_modules_that_are_not_plain_linears_are_called():
    x = torch.randn(2000, 600)
    lin = nn.Linear(600, 64)
    seen = []
    h = lin.register_forward_hook(lambda m, i, o: seen.append(1) or o * 3)
    assert torch.allclose(project(lin, x), 3 * torch.nn.functional.linear(x, lin.weight, lin.bias))
    assert seen == [1]
    h.remove()
    scaled = _Scaled(600, 64)
    assert torch.allclose(project(scaled, x), 2 * torch.nn.functional.linear(x, scaled.weight, scaled.bias))
    # other dtypes, autocast and oneDNN switched off: the module's own computation
    lin64 = nn.Linear(600, 64).double()
    assert torch.equal(project(lin64, x.double()), lin64(x.double()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert project(lin, x).dtype == torch.bfloat16
    with torch.backends.mkldnn.flags(enabled=False):
        assert torch.allclose(project(lin, x), lin(x), rtol=1e-5, atol=1e-5)
    with backend.force_reference():
        with torch.autograd.profiler.profile() as prof:
            project(lin, x)
        assert "neptune::linear" not in [e.name for e in prof.function_events]


@needs_op
@pytest.mark.parametrize("args, match", [
    (lambda: (torch.randn(10, 4, 3), torch.randn(2, 3), None), "input must be 2-D"),
    (lambda: (torch.randn(10, 3), torch.randn(2, 4), None), r"weight must be \[out_features, 3\]"),
    (lambda: (torch.randn(10, 3), torch.randn(2, 3).double(), None), "share dtype and device"),
    (lambda: (torch.randn(10, 3), torch.randn(2, 3), torch.randn(3)), r"bias must be \[2\]"),
])
def test_bad_input_is_a_clear_error(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.neptune.linear(*args())


@needs_op
@pytest.mark.parametrize("make_bias", [lambda: torch.randn(512)[::2], lambda: torch.randn(256, 4)[:, 1],
                                       lambda: torch.randn(1).expand(256)],
                         ids=["every-other", "a-column", "expanded"])
def test_strided_bias(make_bias):
    """oneDNN reads a bias densely: a strided or expanded one must be made contiguous first."""
    x, w, b = torch.randn(1500, 700), torch.randn(256, 700), make_bias()
    want = torch.nn.functional.linear(x.double(), w.double(), b.double())
    assert _relerr(torch.ops.neptune.linear(x, w, b), want) < 2e-5


@needs_op
@pytest.mark.parametrize("hook", ["full_backward", "full_backward_pre", "backward", "global_backward",
                                  "forward_override"])
def test_modules_with_backward_hooks_or_a_replaced_forward_are_called(hook):
    g = torch.nn.modules.module
    lin, seen = nn.Linear(600, 64), []
    x = torch.randn(2000, 600, requires_grad=True)
    undo = None
    if hook == "full_backward":
        undo = lin.register_full_backward_hook(lambda m, gi, go: seen.append(1))
    elif hook == "full_backward_pre":
        undo = lin.register_full_backward_pre_hook(lambda m, go: seen.append(1))
    elif hook == "backward":
        undo = lin.register_backward_hook(lambda m, gi, go: seen.append(1))
    elif hook == "global_backward":
        undo = g.register_module_full_backward_hook(lambda m, gi, go: seen.append(1) if m is lin else None)
    else:
        plain = lin.forward
        lin.forward = lambda t: seen.append(1) or 0 * plain(t)
    try:
        y = project(lin, x)
        y.sum().backward()
    finally:
        if undo is not None:
            undo.remove()
    assert seen, "the module's call (its hooks, its replaced forward) was skipped"
    if hook == "forward_override":
        assert torch.equal(y, torch.zeros_like(y))


@needs_op
def test_sparse_input_calls_the_module():
    lin = nn.Linear(600, 64)
    x = torch.randn(2000, 600)
    want = lin(x)
    for sparse in (x.to_sparse(), x.to_sparse_csr()):
        assert torch.allclose(project(lin, sparse), want, atol=1e-4)


@needs_op
def test_saves_only_what_a_gradient_needs():
    """As torch's Linear: a frozen Linear keeps no input for backward, so an in-place write
    to its input afterwards is no error; a weight written in place under no_grad is no error
    when the input needs no gradient."""
    lin = nn.Linear(600, 64).requires_grad_(False)
    x = torch.randn(2000, 600, requires_grad=True)
    h = x * 1
    y = project(lin, h)
    h.mul_(2)  # the op did not save h (the weight needs no gradient)
    y.sum().backward()
    assert torch.allclose(x.grad, lin.weight.sum(0).expand(2000, -1), atol=1e-5)
    lin2 = nn.Linear(600, 64)
    y = project(lin2, torch.randn(2000, 600))
    with torch.no_grad():
        lin2.weight.mul_(0.5)  # not saved (the input needs no gradient)
    y.sum().backward()
    assert lin2.weight.grad is not None
    lin3 = nn.Linear(600, 64)
    x3 = torch.randn(2000, 600, requires_grad=True)
    y = project(lin3, x3)
    with torch.no_grad():
        lin3.weight.mul_(0.5)  # saved for the input's gradient: torch's usual error
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@needs_op
@pytest.mark.parametrize("args, match", [
    (lambda d: (torch.randn(10, 4, 3, device=d), torch.randn(2, 3, device=d), None), "input must be 2-D"),
    (lambda d: (torch.randn(10, 3, device=d), torch.randn(2, 4, device=d), None), r"weight must be \[out_features, 3\]"),
    (lambda d: (torch.randn(10, 3, device=d), torch.randn(2, 3, device=d).double(), None), "share dtype"),
    (lambda d: (torch.randn(10, 3, device=d), torch.randn(2, 3, device=d), torch.randn(3, device=d)), r"bias must be \[2\]"),
])
def test_fake_kernel_checks_as_the_kernel(args, match):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with pytest.raises(RuntimeError, match=match):
        torch.ops.neptune.linear(*args("meta"))
    with FakeTensorMode(), pytest.raises(RuntimeError, match=match):
        torch.ops.neptune.linear(*args("cpu"))


@needs_op
def test_compiles_after_a_plain_import():
    """The fake kernels are registered by ``import neptune_ext`` (not only by neptune_ext.nn)."""
    import subprocess
    import sys
    code = ("import torch, neptune_ext\n"
            "f = torch.compile(lambda x, w: torch.ops.neptune.linear(x, w, None), fullgraph=True)\n"
            "print(f(torch.randn(4, 3), torch.randn(2, 3)).shape)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "torch.Size([4, 2])" in r.stdout


@pytest.mark.parametrize("use_op", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_project_stack_is_the_projections_in_one_gemm(use_op, bias, monkeypatch):
    """A pair of plain Linears of one input big enough to gain: one GEMM (forward) over the
    stacked weights, the two outputs and every gradient those of the two modules (float64:
    to rounding; float32 against float64)."""
    monkeypatch.setattr(projection, "USE_ONEDNN", use_op)
    fin = projection.STACK_MIN_IN
    a, b = nn.Linear(fin, 48, bias=bias), nn.Linear(fin, 48, bias=bias)
    x = torch.randn(100, fin, requires_grad=True)
    assert x.numel() * 48 >= MIN_MACS
    for dtype in (torch.float64, torch.float32):
        a2, b2 = a.to(dtype), b.to(dtype)
        xd = x.detach().to(dtype).requires_grad_()
        with torch.autograd.profiler.profile() as prof:
            ya, yb = projection.project_stack((a2, b2), xd)
        gemms = [ev.name for ev in prof.function_events
                 if ev.name in ("aten::addmm", "aten::mm", "neptune::linear")]
        assert len(gemms) == 1, gemms
        go_a, go_b = torch.randn(100, 48, dtype=torch.float64), torch.randn(100, 48, dtype=torch.float64)
        got = torch.autograd.grad((ya, yb), [xd, *a2.parameters(), *b2.parameters()],
                                  (go_a.to(dtype), go_b.to(dtype)))
        ref = [t.detach().double().requires_grad_() for t in (xd, *a2.parameters(), *b2.parameters())]
        wa = torch.nn.functional.linear(ref[0], ref[1], ref[2] if bias else None)
        wb = torch.nn.functional.linear(ref[0], *(ref[3:] if bias else ref[2:3]), *(() if bias else (None,)))
        want = torch.autograd.grad((wa, wb), ref, (go_a, go_b))
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        assert _relerr(ya, wa) < tol and _relerr(yb, wb) < tol
        for g, w in zip(got, want):
            assert _relerr(g, w) < tol


def test_project_stack_calls_each_module_where_it_must(monkeypatch):
    """Small products, a hook on either module, a bias on one only, sparse input: each module
    is projected on its own (its hooks run, its own numbers)."""
    fin = projection.STACK_MIN_IN
    a, b = nn.Linear(fin, 48), nn.Linear(fin, 48)
    x = torch.randn(100, fin)

    def gemms(*args):
        with torch.autograd.profiler.profile() as prof:
            ya, yb = projection.project_stack(args[:2], args[2])
        n = sum(ev.name in ("aten::addmm", "aten::mm", "neptune::linear") for ev in prof.function_events)
        return ya, yb, n

    assert gemms(a, b, x)[2] == 1
    assert gemms(a, b, x[:5])[2] == 2  # small: the modules (no cat, no split)
    narrow = nn.Linear(fin - 1, 48), nn.Linear(fin - 1, 48)  # too few input features to gain
    assert gemms(*narrow, torch.randn(1000, fin - 1))[2] == 2
    seen = []
    h = b.register_forward_hook(lambda m, i, o: seen.append(1))
    ya, yb, n = gemms(a, b, x)
    h.remove()
    assert seen and n == 2
    nb = nn.Linear(fin, 48, bias=False)
    ya, yb, n = gemms(a, nb, x)
    assert n == 2 and _relerr(yb, nb(x).double()) < 1e-5
    wide = nn.Linear(fin, 64)  # other output sizes stack too
    ya, yb, n = gemms(a, wide, x)
    assert n == 1 and yb.shape == (100, 64) and _relerr(yb, wide(x).double()) < 1e-5
    xs = x.to_sparse()
    ya, yb, _ = gemms(a, b, xs)
    assert _relerr(ya, a(x).double()) < 1e-5 and _relerr(yb, b(x).double()) < 1e-5


pyg = pytest.importorskip("torch_geometric")


def _off_the_kink(kind, ref, x, ei, margin=1e-4):
    """(x, ei) with every LeakyReLU input of ``ref`` (float64) at least ``margin`` from 0.

    A float32 layer computes those inputs with errors near 1e-6; one within that of 0 lands on
    either side of the kink by chance, and the side decides a whole gradient term (slope 1 or
    0.2). Nodes whose self loop is that close are redrawn; edges that close are dropped."""
    n = x.shape[0]

    def kink_inputs(x):
        with torch.no_grad():
            if kind == "gat":
                h = ref.lin(x.double()).view(n, ref.heads, -1)
                s, d = (h * ref.att_src).sum(-1), (h * ref.att_dst).sum(-1)
                return s[ei[0]] + d[ei[1]], s + d
            xl, xr = ref.lin_l(x.double()), ref.lin_r(x.double())
            return xl[ei[0]] + xr[ei[1]], xl + xr

    for _ in range(100):
        bad = (kink_inputs(x)[1].abs() < margin).any(1)
        if not bad.any():
            break
        x[bad] = torch.randn(int(bad.sum()), x.shape[1])
    else:
        raise AssertionError("self loops keep landing on the kink")
    return x, ei[:, ~(kink_inputs(x)[0].abs() < margin).any(1)]


@needs_op
@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "cached-torch-gemm"])
@pytest.mark.parametrize("fin", [300, projection.STACK_MIN_IN])  # the second: stacked projections
@pytest.mark.parametrize("kind", ["gat", "gatv2", "transformer", "transformer_skip", "transformer_edge"])
def test_layers_at_projection_sizes_match_pyg(kind, fin, onednn, monkeypatch):
    """Graphs big enough that every projection takes the op (with oneDNN; without it, outputs
    of at least projection.CACHE_MIN_BYTES): float32 output and gradients against PyG's layer
    in float64 (same weights)."""
    from torch_geometric.nn import GATConv, GATv2Conv, TransformerConv
    from neptune_ext.nn import GraphAttention, GraphAttentionV2, GraphTransformer
    monkeypatch.setattr(projection, "USE_ONEDNN", onednn)
    n = 1200 if onednn else projection.CACHE_MIN_BYTES // (4 * 64) + 10  # [n, 4 heads x 16] float32
    e = 5 * n
    ours_cls, ref_cls, kw = {"gat": (GraphAttention, GATConv, dict(residual=True)),
                             "gatv2": (GraphAttentionV2, GATv2Conv, dict(residual=True)),
                             "transformer": (GraphTransformer, TransformerConv, dict(beta=True)),
                             "transformer_skip": (GraphTransformer, TransformerConv, dict()),
                             "transformer_edge": (GraphTransformer, TransformerConv, dict(edge_dim=8))}[kind]
    ref = ref_cls(fin, 16, heads=4, **kw).double()
    ours = ours_cls(fin, 16, heads=4, **kw)
    ours.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    x = torch.randn(n, fin)
    ei = torch.randint(0, n, (2, e))
    if kind in ("gat", "gatv2"):
        x, ei = _off_the_kink(kind, ref, x, ei)
    ea = torch.randn(ei.shape[1], 8) if kind == "transformer_edge" else None
    args = (ei,) if ea is None else (ei, ea)
    with torch.autograd.profiler.profile() as prof:
        y = ours(x, *args)
    assert "neptune::linear" in [ev.name for ev in prof.function_events]
    want = ref(x.double(), *(args if ea is None else (ei, ea.double())))
    assert _relerr(y, want) < 1e-5
    go = torch.randn_like(want)
    y.backward(go.float())
    want.backward(go)
    got = dict(ours.named_parameters())
    # (the key bias's gradient is 0 up to rounding - a softmax ignores a shift per row - so
    # each error is also measured against the largest gradient's scale)
    scale = max(float(p.grad.abs().max()) for p in ref.parameters())
    for name, p in ref.named_parameters():
        assert _relerr(got[name].grad, p.grad, floor=1e-2 * scale) < 1e-4, name


def test_projection_bench_records(tmp_path, monkeypatch):
    """neptune_app.bench.projection runs and writes its JSON (a smoke test: nothing timed is judged)."""
    import json
    from neptune_app.bench import projection as bench
    monkeypatch.setattr(bench, "CASES", {"tiny": (2000, 600, 64, True)})
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")  # recorded with the figures
    path = tmp_path / "projection.json"
    bench.main(["--rounds", "2", "--json", str(path)])
    report = json.loads(path.read_text())
    assert report["environment"]["GLIBC_TUNABLES"] == "glibc.malloc.trim_threshold=1"
    assert report["benchmark"] == "projection" and report["results"][0]["case"] == "tiny"
    assert set(report["results"][0]["median_ms"]) == {"torch", "neptune_ext"}
    assert set(report["results"][0]["cached_torch_gemm"]["median_ms"]) == {"forward", "backward", "step"}


@pytest.mark.parametrize("kind", ["gat", "gatv2", "transformer"])
def test_dynamically_quantized_layers_run(kind):
    """torch.ao.quantization.quantize_dynamic replaces the layers' Linears with modules whose
    weight is a method: the layers call them (the projections' quantization error, no crash)."""
    from neptune_ext.nn import GraphAttention, GraphAttentionV2, GraphTransformer
    cls = {"gat": GraphAttention, "gatv2": GraphAttentionV2, "transformer": GraphTransformer}[kind]
    for fin in (300, 64):  # wider and narrower than heads x channels
        layer = cls(fin, 64, heads=4)
        x, ei = torch.randn(1500, fin), torch.randint(0, 1500, (2, 8000))
        q = torch.ao.quantization.quantize_dynamic(layer, {nn.Linear}, dtype=torch.qint8)
        want, got = layer(x, ei), q(x, ei)
        err = float((got - want).norm() / want.norm())
        assert 0 < err < 0.1, err
