"""Error measures and float64 oracles shared by the CUDA kernel tests
(test_graph_attention_cuda.py on a GPU, test_graph_attention_cuda_emulated.py anywhere)."""
import torch
import torch.nn.functional as F

from neptune_ext.attention.reference import dropout_keep_mask, segment_softmax, sparse_graph_attention_reference

# Norm-wise error ||x - ref|| / ||mag|| allowed against float64 oracles fed the same
# (rounded) inputs, where mag is the same sum taken over the absolute values of its
# terms (the scale rounding errors of a sum live on; a sum that cancels to ~0, like
# the score gradient of a destination with one in-edge, is judged on its terms).
# The kernels accumulate in fp32 (fp64 for fp64), so what is left is the rounding of
# the stored results (fp16: 2^-11, bf16: 2^-8 per element) plus accumulation noise.
TOL_OUT = {torch.float64: 1e-12, torch.float32: 5e-6, torch.float16: 1.5e-3, torch.bfloat16: 1.2e-2}
TOL_GRAD = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 6e-3, torch.bfloat16: 5e-2}


def rel_err(x, ref, mag=None):
    x, ref = x.double(), ref.double()
    den = (ref if mag is None else mag).norm().item()
    return (x - ref).norm().item() / (den if den > 0 else 1.0)


def reference(g, h, ss, sd, el, go, slope=0.2, p=0.0, seed=None):
    """The autograd float64 reference: (out, [grad_h, grad_ss, grad_sd(, grad_el)])."""
    ins = [t.detach().double().requires_grad_() for t in (h, ss, sd, el) if t is not None]
    out = sparse_graph_attention_reference(ins[0], ins[1], ins[2], g.edge_index[0], g.edge_index[1],
                                           g.num_dst, slope, ins[3] if el is not None else None, p,
                                           None if seed is None else int(seed))
    grads = torch.autograd.grad(out, ins, go.double(), allow_unused=True)
    return out.detach(), [torch.zeros_like(x) if gr is None else gr for x, gr in zip(ins, grads)]


def backward_given_out(g, h, ss, sd, el, go, out, slope=0.2, p=0.0, seed=None):
    """The backward formulas in float64, with D = <dOut, out> taken from the `out` the
    kernel stored (rounded to its dtype), as the kernel does. Against this, the
    kernel's error is its own arithmetic and output rounding. The autograd reference
    also sees the rounding of `out`, which a graph can amplify without bound (a
    destination whose in-edges nearly all come from one source: that source's dS
    terms cancel to a small sum, the rounding of D does not), so low-precision
    gradients are judged against this."""
    src, dst = g.edge_index
    # LeakyReLU's side as the kernel sees it: (score_dst + score_src) + edge_logits rounded in
    # its accumulation type (a float64 sum within that rounding of 0 would take the other side
    # by chance, and the slope of the whole edge's gradient with it)
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    raw_k = sd.detach().to(acc)[dst] + ss.detach().to(acc)[src]
    if el is not None:
        raw_k = raw_k + el.detach().to(acc)
    h, ss, sd, go, out = (t.detach().double() for t in (h, ss, sd, go, out))
    raw = ss[src] + sd[dst]
    if el is not None:
        raw = raw + el.detach().double()
    a = segment_softmax(F.leaky_relu(raw, slope), dst, g.num_dst)
    a_kept = a
    if p > 0:
        keep = dropout_keep_mask(int(seed), torch.arange(src.numel(), device=src.device), a.shape[1], p)
        a_kept = a * keep.double() / (1.0 - p)
    D = (go * out).sum(-1)
    lrelu_grad = torch.where(raw_k > 0, torch.ones_like(raw), torch.full_like(raw, slope))
    dS = (a_kept * (go[dst] * h[src]).sum(-1) - a * D[dst]) * lrelu_grad
    gh = torch.zeros_like(h).index_add_(0, src, a_kept.unsqueeze(-1) * go[dst])
    gss = torch.zeros_like(ss).index_add_(0, src, dS)
    gsd = torch.zeros_like(sd).index_add_(0, dst, dS)
    grads = [gh, gss, gsd] + ([dS] if el is not None else [])
    # The same sums over |terms|: the scale of their rounding errors.
    t_abs = ((a_kept * (go[dst] * h[src]).sum(-1)).abs() + (a * D[dst]).abs()) * lrelu_grad.abs()
    mags = [torch.zeros_like(h).index_add_(0, src, (a_kept.unsqueeze(-1) * go[dst]).abs()),
            torch.zeros_like(ss).index_add_(0, src, t_abs),
            torch.zeros_like(sd).index_add_(0, dst, t_abs)] + ([t_abs] if el is not None else [])
    out_mag = torch.zeros_like(out).index_add_(0, dst, (a_kept.unsqueeze(-1) * h[src]).abs())
    return grads, mags, out_mag


def check_results(g, dtype, ins, out, grads, go, slope=0.2, p=0.0, seed=None, grad_tol=None):
    """Asserts out against the autograd reference, the gradients against
    backward_given_out (and, in float64, against the autograd reference too)."""
    h, ss, sd, el = ins
    ref, ref_grads = reference(g, h, ss, sd, el, go, slope, p, seed)
    given, mags, out_mag = backward_given_out(g, h, ss, sd, el, go, out, slope, p, seed)
    e = rel_err(out, ref, out_mag)
    assert e <= TOL_OUT[dtype], ("out", dtype, e)
    tol = grad_tol or TOL_GRAD[dtype]
    names = ("h", "score_src", "score_dst", "edge_logits")
    for name, a, b, m in zip(names, grads, given, mags):
        e = rel_err(a, b, m)
        assert e <= tol, (name, dtype, "vs backward given out", e)
    if dtype == torch.float64:
        for name, a, b, m in zip(names, grads, ref_grads, mags):
            e = rel_err(a, b, m)
            assert e <= tol, (name, dtype, "vs autograd reference", e)
