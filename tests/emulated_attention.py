"""The CUDA attention kernels run on the CPU by tests/cuda_emulation, as the emulated tests
of every variant see them: the build, one forward + backward with the NaN-poison check,
and one check of a run against the float64 reference and the CPU kernel."""
import os
import sys

import pytest
import torch

from attention_variants import GAT, TRANSFORMER
from graph_attention_checks import TOL_GRAD, TOL_OUT, check_results, rel_err

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emulation"))
import build as emulation  # noqa: E402

MAX_HC = 1024  # the GATv2 and transformer CUDA kernels' H * C limit (one warp per row)


def load(kind="default"):
    """The emulated kernels (kind "default": the real constants; "deep": GAT's hub records
    with leaf segments of 4 edges and fan-in 2), or a skip where they cannot be built."""
    from torch.utils import cpp_extension
    if os.environ.get("NEPTUNE_SKIP_EMULATION", "0") == "1":
        pytest.skip("NEPTUNE_SKIP_EMULATION=1")
    if not cpp_extension.is_ninja_available():
        pytest.skip("ninja is needed to build the CUDA emulation")
    return emulation.load(kind)


def cpu_op(variant):
    """torch.ops.neptune (the CPU kernels), or None when the extension is not built."""
    return torch.ops.neptune if variant.compiled() else None


def default_param(variant, C):
    return C ** -0.5 if variant is TRANSFORMER else 0.2


def inputs(variant, g, H, C, dtype, edge=True, n_dst=None):
    """Inputs drawn in float64 and rounded to dtype. GATv2's att is scaled like a glorot-
    initialized one: logits of order 1 (with 1024 unit terms per logit the softmax is
    one-hot and every gradient is cancellation noise)."""
    n_dst = g.num_dst if n_dst is None else n_dst
    ins = list(variant.inputs(g.num_src, n_dst, g.num_edges, H, C, requires_grad=False, edge=edge))
    if variant.name == "gatv2":
        ins[2] = ins[2] / C**0.5
    return tuple(None if t is None else t.to(dtype) for t in ins)


def run(ops, variant, g, ins, go, param, p=0.0, seed=None, poison=True):
    """Forward and backward of the kernels in ops: (out, lse, [the four gradients])."""
    fwd = getattr(ops, variant.op + "_forward")
    bwd = getattr(ops, variant.op + "_backward")
    out, lse = fwd(*ins[:3], g.rowptr, g.col, g.eid, *g.csc(), ins[3], param, p, seed)
    if go is None:
        go = torch.randn(out.shape, dtype=torch.float64).to(out.dtype)
    grads = bwd(go, *ins[:3], g.rowptr, g.col, g.eid, *g.csc(), ins[3], out, lse, param, p, seed)
    if poison:
        names = ("out", "lse") + tuple("grad_" + n for n in variant.arg_names)
        for name, t in zip(names, (out, lse) + tuple(grads)):
            assert not torch.isnan(t).any(), f"{name}: elements left unwritten (NaN poison)"
    return out, lse, list(grads), go


def check(ops, variant, g, H, C, dtype, edge=True, p=0.0, param=None, n_dst=None, ins=None):
    """One forward + backward of the emulated kernels on random inputs, checked: shapes and
    dtypes; in float64 against the float64 reference (output and every gradient through
    autograd); in every dtype against the CPU kernel fed the same rounded inputs; GAT's
    also against its float64 oracles (graph_attention_checks.check_results). n_dst below
    the graph's: the rows beyond are ignored (GATv2). Returns (out, lse, grads)."""
    n_dst = g.num_dst if n_dst is None else n_dst
    ins = inputs(variant, g, H, C, dtype, edge, n_dst) if ins is None else ins
    param = default_param(variant, C) if param is None else param
    go = torch.randn(n_dst, H, C, dtype=torch.float64).to(dtype)
    seed = torch.tensor(4321) if p > 0 else None
    out, lse, grads, _ = run(ops, variant, g, ins, go, param, p, seed)
    assert out.dtype == dtype and out.shape == (n_dst, H, C)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if edge:
        assert grads[3].shape == ins[3].shape
    else:
        assert grads[3].numel() == 0
        grads = grads[:3]
    if dtype == torch.float64:
        ref_ins = [None if t is None else t.detach().clone().requires_grad_() for t in ins]
        if n_dst < g.num_dst:  # the reference gets zero rows there and its output is cut
            # (edge ids, and so the dropout mask, stay the caller's)
            assert variant.fewer_rows
            pad = torch.zeros(g.num_dst - n_dst, H, C, dtype=dtype)
            ref_in = [ref_ins[0], torch.cat([ref_ins[1], pad])] + ref_ins[2:]
        else:
            ref_in = ref_ins
        ref = variant.reference_fn(*ref_in[:3], g.edge_index[0], g.edge_index[1], g.num_dst, param,
                                   ref_in[3], p, None if seed is None else int(seed))[:n_dst]
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        exp = torch.autograd.grad(ref, [t for t in ref_ins if t is not None], go, allow_unused=True)
        for name, a, b in zip(variant.arg_names, grads, exp):
            b = torch.zeros_like(a) if b is None else b
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11, msg=lambda m: f"grad {name}: {m}")
    if variant is GAT:
        check_results(g, dtype, ins, out, grads, go, param, p, seed)
    cpu = cpu_op(variant)
    if cpu is None:
        if dtype == torch.float64:
            return out, lse, grads
        pytest.skip("the compiled extension (CPU kernel, the oracle below float64) is not built")
    c_out, c_lse, c_grads, _ = run(cpu, variant, g, ins, go, param, p, seed, poison=False)
    assert rel_err(out, c_out) <= TOL_OUT[dtype], ("out", rel_err(out, c_out))
    assert rel_err(lse, c_lse) <= TOL_OUT[dtype], ("lse", rel_err(lse, c_lse))
    # Below float64 the gradients against the CPU kernel; in float64 they were held to the
    # reference above (the CPU kernel's would add nothing but the noise of sums that cancel,
    # like grad q of a row with one in-edge). GAT's were held to check_results, whose
    # backward takes D = <dOut, out> from this kernel's own rounded out (the CPU kernel's
    # out rounds apart, and a graph can amplify that without bound).
    if dtype != torch.float64 and variant is not GAT:
        for name, a, b in zip(variant.arg_names, grads, c_grads):
            assert rel_err(a, b) <= TOL_GRAD[dtype], (name, rel_err(a, b))
    return out, lse, grads
