"""The graph-transformer attention op: what the transformer alone has - infinite logits
follow torch.softmax. What every attention variant has (the fused kernel against the
float64 reference, gradcheck, gradgradcheck, opcheck, compile, low precision, determinism,
dropout, adversarial graphs and bad input) is in test_attention_ops.py."""
import pytest
import torch

from neptune_ext import Graph, ops

from attention_variants import TRANSFORMER


def test_infinite_logits_follow_torch_softmax():
    """A -inf logit is a mask (weight 0); a row of only masked logits gives 0, not NaN."""
    ei = torch.tensor([[0, 1, 2, 0], [0, 0, 0, 1]])
    g = Graph.from_edge_index(ei, (3, 2))
    q = torch.ones(2, 1, 1, dtype=torch.float64)
    k = torch.tensor([[[1.0]], [[-float("inf")]], [[2.0]]], dtype=torch.float64)
    v = torch.randn(3, 1, 1, dtype=torch.float64)
    out = ops.transformer_attention(q, k, v, g, 1.0)
    exp = TRANSFORMER.reference((q, k, v, None), g, 1.0)
    torch.testing.assert_close(out, exp, rtol=1e-12, atol=1e-12)
    assert not torch.isnan(out[0]).any()


@pytest.mark.parametrize("bias", [0.0, 30.0])
def test_edge_features_float32_gradients_with_a_key_bias_and_a_hub(bias):
    """The edge-feature backward normalizes its weights a = exp(x - lse) by their sum A
    (lse's rounding would otherwise leave k_common D (1 - A) in grad q: 17x the reference's
    error at a key bias of 30) and sums grad q per row as (P - (D / A) Q) / A, keys read once.
    With a large common key part and a hub row holding half the edges, its float32 gradients
    stay within a small factor of the pure-PyTorch reference's own float32 error (both
    against the kernel in float64, itself checked against the reference to 1e-11)."""
    from neptune_ext import backend
    n, E, H, C, D = 400, 4000, 4, 16, 8
    src, dst = torch.randint(0, n, (E,)), torch.randint(0, n, (E,))
    dst[: E // 2] = 0
    g = Graph.from_edge_index(torch.stack([src, dst]), n)
    q = torch.randn(n, H, C, dtype=torch.float64)
    kv = torch.randn(n, 2, H, C, dtype=torch.float64)
    kv[:, 0] += bias
    w = 0.3 * torch.randn(H, C, D, dtype=torch.float64)
    ea = torch.randn(E, D, dtype=torch.float64)
    go = torch.randn(n, H, C, dtype=torch.float64)

    def grads(dtype, reference=False):
        ins = [t.to(dtype).requires_grad_() for t in (q, kv, w, ea)]
        with backend.force_reference(reference):
            out = ops.transformer_edge_attention(ins[0], ins[1], ins[2], g, edge_attr=ins[3], scale=C ** -0.5)
            return torch.autograd.grad(out, ins, go.to(dtype))

    exact, ours, theirs = grads(torch.float64), grads(torch.float32), grads(torch.float32, True)
    for name, t, a, b in zip(("q", "kv", "w_edge", "edge_attr"), exact, ours, theirs):
        err = float((a.double() - t).norm() / t.norm())
        ref_err = float((b.double() - t).norm() / t.norm())
        assert err <= 4 * ref_err + 1e-6, f"grad {name}: {err:.3g} against the reference's {ref_err:.3g}"
