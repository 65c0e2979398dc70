"""Pure-PyTorch reference implementations: the test oracle and the fallback.

These are written for clarity, not speed: they materialize per-edge tensors
(E x H and E x H x C), exactly the cost the fused kernels avoid.
"""
import torch
import torch.nn.functional as F

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 tensors holding uint32 values, without overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def _fmix32_int(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def dropout_keep_mask(seed: int, edge_ids: torch.Tensor, num_heads: int, p: float) -> torch.Tensor:
    """The kernels' counter-based dropout mask [E, H] (True = kept), bit for bit
    (see csrc/attention/common/attention_math.h)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    s = _fmix32_int((seed & _M32) ^ _fmix32_int(((seed >> 32) + 0x632BE5AB) & _M32))
    e = edge_ids.to(torch.int64).unsqueeze(1)
    head = torch.arange(num_heads, device=edge_ids.device, dtype=torch.int64).unsqueeze(0)
    x = _fmix32(((e >> 32) + _mul32(head, 0x9E3779B9)) & _M32)
    x = _fmix32(x ^ (e & _M32))
    x = _fmix32(x ^ s)
    u = (x >> 8).to(torch.float32) * (1.0 / 16777216.0)
    return u >= torch.tensor(p, dtype=torch.float32)


def segment_softmax(logits: torch.Tensor, index: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Softmax of logits [E, H] within groups of equal `index` [E].

    Infinite logits as in torch.softmax: -inf gets weight 0, +inf makes its group NaN,
    NaN propagates; a group whose logits are all -inf gets weights 0 (not NaN), like
    a destination without in-edges."""
    H = logits.shape[1]
    idx = index.unsqueeze(1).expand(-1, H)
    m = logits.new_full((num_segments, H), float("-inf"))
    m = m.scatter_reduce(0, idx, logits, reduce="amax", include_self=True)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)  # all-masked groups
    ex = torch.exp(logits - m[index])
    denom = logits.new_zeros((num_segments, H)).index_add(0, index, ex)
    denom = torch.where(denom == 0, torch.ones_like(denom), denom)  # all-masked: ex = 0 there
    return ex / denom[index]


def softmax_with_dropout(logits, dst, num_dst, dropout=0.0, seed=None):
    """segment_softmax of logits [E, H] per destination, then the kernels' counter-based
    dropout (edge ids = positions in the caller's order), scaled by 1 / (1 - dropout)."""
    alpha = segment_softmax(logits, dst, num_dst)
    if dropout > 0.0:
        keep = dropout_keep_mask(seed, torch.arange(dst.numel(), device=dst.device),
                                 alpha.shape[1], dropout)
        alpha = alpha * keep.to(alpha.dtype) / (1.0 - dropout)
    return alpha


def aggregate(alpha, values, dst, num_dst):
    """out_i = sum over edges e into i of alpha[e] * values[e]: [num_dst, H, C]."""
    out = values.new_zeros((num_dst,) + tuple(values.shape[1:]))
    return out.index_add(0, dst, alpha.unsqueeze(-1) * values)


def attention_weights_reference(score_src, score_dst, src, dst, num_dst, negative_slope=0.2,
                                edge_logits=None, dropout=0.0, seed=None):
    """Attention weights a_e [E, H] (after dropout when dropout > 0), caller's edge order."""
    raw = score_src[src] + score_dst[dst]
    if edge_logits is not None:
        raw = raw + edge_logits
    return softmax_with_dropout(F.leaky_relu(raw, negative_slope), dst, num_dst, dropout, seed)


def sparse_graph_attention_reference(h, score_src, score_dst, src, dst, num_dst,
                                     negative_slope=0.2, edge_logits=None, dropout=0.0,
                                     seed=None, return_attention=False):
    """out_i = sum_j softmax_j(LeakyReLU(score_src[j] + score_dst[i] + e_ij)) h_j.

    h [N_src, H, C], score_src [N_src, H], score_dst [N_dst, H], src/dst [E] in the
    caller's edge order, edge_logits [E, H]. A destination with no in-edges gets 0.
    """
    alpha = attention_weights_reference(score_src, score_dst, src, dst, num_dst,
                                        negative_slope, edge_logits, dropout, seed)
    out = aggregate(alpha, h[src], dst, num_dst)
    return (out, alpha) if return_attention else out


def gatv2_attention_weights_reference(x_l, x_r, att, src, dst, num_dst, negative_slope=0.2,
                                      edge_feat=None, dropout=0.0, seed=None):
    """GATv2 attention weights [E, H] (after dropout when dropout > 0), caller's edge order:
    softmax over each destination's in-edges of sum_c att[h, c] LeakyReLU(x_l[j] + x_r[i] + e_ij)."""
    z = x_l[src] + x_r[dst]
    if edge_feat is not None:
        z = z + edge_feat
    logits = (F.leaky_relu(z, negative_slope) * att.reshape(1, *x_l.shape[1:])).sum(-1)
    return softmax_with_dropout(logits, dst, num_dst, dropout, seed)


def gatv2_attention_reference(x_l, x_r, att, src, dst, num_dst, negative_slope=0.2,
                              edge_feat=None, dropout=0.0, seed=None, return_attention=False):
    """out_i = sum_j a_ij x_l[j] with GATv2's dynamic attention (see
    gatv2_attention_weights_reference). x_l [N_src, H, C], x_r [N_dst, H, C], att [H, C],
    src/dst [E] in the caller's order, edge_feat [E, H, C]."""
    alpha = gatv2_attention_weights_reference(x_l, x_r, att, src, dst, num_dst, negative_slope,
                                              edge_feat, dropout, seed)
    out = aggregate(alpha, x_l[src], dst, num_dst)
    return (out, alpha) if return_attention else out


def transformer_attention_weights_reference(q, k, src, dst, num_dst, scale, edge_feat=None,
                                            dropout=0.0, seed=None):
    """Graph-transformer attention weights [E, H] (after dropout when dropout > 0), caller's
    edge order: softmax over each destination's in-edges of scale * <q[i], k[j] (+ e_ij)>."""
    key = k[src]
    if edge_feat is not None:
        key = key + edge_feat
    logits = (q[dst] * key).sum(-1) * scale
    return softmax_with_dropout(logits, dst, num_dst, dropout, seed)


def transformer_attention_reference(q, k, v, src, dst, num_dst, scale, edge_feat=None, dropout=0.0,
                                    seed=None, return_attention=False):
    """out_i = sum_j a_ij (v[j] (+ e_ij)) with the graph-transformer attention of
    transformer_attention_weights_reference. q [N_dst, H, C], k and v [N_src, H, C],
    src/dst [E] in the caller's order, edge_feat [E, H, C] (added to keys and values)."""
    alpha = transformer_attention_weights_reference(q, k, src, dst, num_dst, scale, edge_feat,
                                                    dropout, seed)
    val = v[src]
    if edge_feat is not None:
        val = val + edge_feat
    out = aggregate(alpha, val, dst, num_dst)
    return (out, alpha) if return_attention else out
