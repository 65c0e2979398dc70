"""The graph-transformer attention op: what the transformer alone has - infinite logits
follow torch.softmax. What every attention variant has (the fused kernel against the
float64 reference, gradcheck, gradgradcheck, opcheck, compile, low precision, determinism,
dropout, adversarial graphs and bad input) is in test_attention_ops.py."""
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
